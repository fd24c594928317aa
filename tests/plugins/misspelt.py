"""Test plugin with a misspelt hook name, which the manager must refuse instead of silently ignoring."""

from hooks import StageSpec, hookimpl


@hookimpl
def recsys_regster_stages(register):
    register(StageSpec(name="never_seen", factory=dict))
