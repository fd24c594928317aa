"""The recsys plugin contract: hook specs, markers and the plugin manager.

Depends only on the standard library and pluggy, so a third-party plugin can depend on this package
alone. A plugin marks its implementations with :data:`hookimpl` and is found through the
``recsys.plugins`` entry point group::

    from hooks import StageSpec, hookimpl

    @hookimpl
    def recsys_register_stages(register):
        register(StageSpec(name="my_ranker", factory=MyRanker, kind="ranking"))
"""

from hooks.manager import (
    DISABLE_ENTRYPOINTS_ENV,
    ENTRY_POINT_GROUP,
    PluginError,
    RecsysPluginManager,
    StageConfigError,
    entrypoints_disabled,
)
from hooks.spec import PROJECT_NAME, STAGE_KINDS, StageSpec, hookimpl, hookspec

__all__ = [
    "DISABLE_ENTRYPOINTS_ENV",
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "STAGE_KINDS",
    "PluginError",
    "RecsysPluginManager",
    "StageConfigError",
    "StageSpec",
    "entrypoints_disabled",
    "hookimpl",
    "hookspec",
]
