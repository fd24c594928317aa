"""Test plugin: records that it ran; its after-rank hook takes only a subset of the spec's arguments."""

from hooks import hookimpl


@hookimpl
def recsys_before_rank(request):
    return {**request, "trace": [*request.get("trace", ()), "audit"]}


@hookimpl
def recsys_after_rank(ranking):
    return {**ranking, "tags": [*ranking["tags"], "audit"]}
