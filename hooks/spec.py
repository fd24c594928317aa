"""Hook specifications of the recsys plugin contract.

A plugin is any module or object whose functions are marked with :data:`hooks.hookimpl` and named
after one of the ``recsys_*`` specs below. It may implement any subset of them, and each
implementation may accept any subset of a spec's arguments (pluggy passes only the ones it names).
Every hook receives ``stage_name`` where it matters, so a plugin must check it and return ``None``
for stages it does not care about.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

PROJECT_NAME = "recsys"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

STAGE_KINDS = ("ranking", "retrieval", "filter")


@dataclass(frozen=True)
class StageSpec:
    """A pipeline stage a plugin offers, passed to the ``register`` callback of
    :func:`recsys_register_stages`.

    ``factory(config, context)`` builds the stage object from its (already validated) config section
    and an opaque, pipeline-provided context (``None`` when the caller has none). ``final`` marks a
    ranking stage whose output is the pipeline's final ordering. ``plugin`` is filled in by the
    manager with the registering plugin's name; whatever a plugin puts there is overwritten.
    """

    name: str
    factory: Callable[[dict[str, Any], Any], Any]
    kind: str = "ranking"
    final: bool = False
    description: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        # Fail at registration, in the plugin's own traceback, rather than when a pipeline is built.
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"StageSpec.name must be a non-empty string, got {self.name!r}")
        if not callable(self.factory):
            raise ValueError(f"StageSpec {self.name!r}: factory must be callable, got {self.factory!r}")
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"StageSpec {self.name!r}: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.final and self.kind != "ranking":
            raise ValueError(f"StageSpec {self.name!r}: only a 'ranking' stage can be final")


@hookspec
def recsys_register_stages(register: Callable[[StageSpec], None]) -> None:
    """Offer stages by calling ``register(StageSpec(...))`` once per stage.

    Stage names are global: two plugins registering the same name is an error, so prefix names that
    could clash. The return value is ignored.
    """


@hookspec
def recsys_validate_stage_config(stage_name: str, config: dict[str, Any]) -> list[str] | None:
    """Check ``config``, the config section of stage ``stage_name``, before the stage is built.

    Return a list of human-readable error messages, or ``None``/``[]`` when the config is fine or the
    stage is not yours. Report every problem found rather than stopping at the first; the manager
    gathers the messages of all plugins into one error. Do not mutate ``config``.
    """


@hookspec
def recsys_before_rank(stage_name: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """Adjust a ranking request (e.g. business rules dropping candidates) before stage ``stage_name`` ranks.

    Return the request to use from here on, or ``None`` to leave it unchanged. Implementations are
    chained in hook-call order: each sees the request returned by the previous one. Return a new dict
    rather than mutating ``request``, which the caller may still hold.
    """


@hookspec
def recsys_after_rank(stage_name: str, request: dict[str, Any], ranking: Any) -> Any | None:
    """Adjust the ranking stage ``stage_name`` produced for ``request`` (e.g. boosting, logging).

    Return the ranking to use from here on, or ``None`` to leave it unchanged. Chained like
    :func:`recsys_before_rank`; ``request`` is the request the stage actually ranked.
    """


@hookspec
def recsys_feedback(stage_name: str, event: dict[str, Any]) -> Any | None:
    """Receive a feedback event (click, purchase, rating...) addressed to stage ``stage_name``.

    Return an acknowledgement (any non-``None`` value, e.g. what was updated) if you consumed the
    event, else ``None``. The sender gets the list of all acknowledgements.
    """
