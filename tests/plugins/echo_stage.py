"""Test plugin owning one stage, ``echo_ranker``, which returns the first ``top_k`` candidates."""

from hooks import StageSpec, hookimpl

STAGE = "echo_ranker"


class EchoRanker:
    def __init__(self, config, context):
        self.top_k = config["top_k"]
        self.context = context

    def rank(self, request):
        return {"items": list(request["candidates"][: self.top_k]), "tags": []}


@hookimpl
def recsys_register_stages(register):
    register(StageSpec(name=STAGE, factory=EchoRanker, kind="ranking", final=True, description="echo"))


@hookimpl
def recsys_validate_stage_config(stage_name, config):
    if stage_name != STAGE:
        return None
    errors = []
    top_k = config.get("top_k")
    if not isinstance(top_k, int) or top_k <= 0:
        errors.append(f"top_k must be a positive integer, got {top_k!r}")
    errors.extend(f"unknown key {key!r}" for key in sorted(set(config) - {"top_k"}))
    return errors


@hookimpl
def recsys_feedback(stage_name, event):
    if stage_name != STAGE:
        return None
    return {"acked": event["id"]}
