"""Test plugin: business rules applied around every stage.

Drops blocked candidates before ranking and tags the ranking afterwards; both append to a trace so
tests can see the order plugins ran in and that each saw the previous plugin's output.
"""

from hooks import hookimpl


@hookimpl
def recsys_before_rank(stage_name, request):
    blocked = set(request.get("blocked", ()))
    return {
        **request,
        "candidates": [c for c in request["candidates"] if c not in blocked],
        "trace": [*request.get("trace", ()), "business_rules"],
    }


@hookimpl
def recsys_after_rank(stage_name, request, ranking):
    return {**ranking, "tags": [*ranking["tags"], "business_rules"]}
