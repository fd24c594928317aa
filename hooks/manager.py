"""Loading recsys plugins and calling their hooks."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from hooks import spec
from hooks.spec import PROJECT_NAME, StageSpec

ENTRY_POINT_GROUP = "recsys.plugins"
DISABLE_ENTRYPOINTS_ENV = "RECSYS_DISABLE_ENTRYPOINTS"
_TRUTHY = frozenset({"1", "true", "yes"})


class PluginError(Exception):
    """A plugin could not be loaded or registered, or broke the hook contract."""


class StageConfigError(PluginError, ValueError):
    """The plugins owning a stage rejected its config; ``errors`` holds every message they returned."""

    def __init__(self, stage_name: str, errors: Sequence[str]) -> None:
        self.stage_name = stage_name
        self.errors = list(errors)
        super().__init__(f"invalid config for stage {stage_name!r}: " + "; ".join(self.errors))


def entrypoints_disabled() -> bool:
    """True when the ``RECSYS_DISABLE_ENTRYPOINTS`` environment variable is set to 1/true/yes."""
    return os.environ.get(DISABLE_ENTRYPOINTS_ENV, "").strip().lower() in _TRUTHY


def _default_name(plugin: object) -> str:
    # pluggy would fall back to str(id(plugin)) for instances, a name nobody can put in a disable list.
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _call(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    # Like pluggy: an implementation may declare only some of the spec's arguments.
    return impl.function(*(kwargs[arg] for arg in impl.argnames))


class RecsysPluginManager:
    """Registers recsys plugins and runs the hooks of :mod:`hooks.spec` with the contract's semantics.

    Plugins are registered built-ins first, then setuptools entry points of group ``recsys.plugins``
    (each under its entry point name), then unknown (e.g. misspelt) hook implementations are rejected.
    ``enabled`` (``None``: all) and ``disabled`` select among both by name; entry points left out are
    never imported, so disabling is also the way around a broken third-party plugin. ``load_entrypoints``
    ``None`` loads entry points unless ``RECSYS_DISABLE_ENTRYPOINTS`` is truthy; a bool overrides it.
    A built-in is a plugin (registered under its ``__name__``) or a ``(name, plugin)`` pair.
    """

    def __init__(
        self,
        builtins: Sequence[object] = (),
        enabled: Sequence[str] | None = None,
        disabled: Sequence[str] = (),
        load_entrypoints: bool | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(spec)
        if load_entrypoints is None:
            load_entrypoints = not entrypoints_disabled()
        named = [item if isinstance(item, tuple) else (_default_name(item), item) for item in builtins]
        eps = list(entry_points(group=ENTRY_POINT_GROUP)) if load_entrypoints else []
        known = list(dict.fromkeys([name for name, _ in named] + [ep.name for ep in eps]))
        for name in [*(enabled or ()), *disabled]:
            if name not in known:
                raise PluginError(
                    f"unknown plugin {name!r} in enabled/disabled lists; known plugins: {known}"
                )
        active = {n for n in known if (enabled is None or n in enabled) and n not in disabled}
        for name, plugin in named:
            if name in active:
                self._register(plugin, name)
        for ep in eps:
            if ep.name in active:
                self._load_entrypoint(ep)
        self.check_pending()

    def _load_entrypoint(self, ep: EntryPoint) -> None:
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"cannot load recsys plugin entry point {ep.name!r} ({ep.value}): {exc!r}"
            ) from exc
        # The same module may be both a built-in and advertised as an entry point by its own package.
        if self.pm.is_registered(plugin):
            return
        self._register(plugin, ep.name)

    def _register(self, plugin: object, name: str) -> None:
        try:
            self.pm.register(plugin, name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} does not match the recsys hook specs: {exc}") from exc
        except ValueError as exc:  # pluggy: the name or the object is already registered
            raise PluginError(f"cannot register plugin {name!r}: {exc}") from exc

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin`` (ignoring the enabled/disabled lists) and return its name.

        Raises :class:`PluginError`, leaving the manager unchanged, if the name or object is taken or
        the plugin implements a hook that does not exist.
        """
        name = name or _default_name(plugin)
        self._register(plugin, name)
        try:
            self.check_pending()
        except PluginError:
            self.pm.unregister(name=name)
            raise
        return name

    def unregister(self, name: str) -> object:
        """Remove the plugin registered as ``name`` and return it."""
        if not self.pm.has_plugin(name):
            raise PluginError(f"no plugin named {name!r}; registered plugins: {self.plugin_names()}")
        return self.pm.unregister(name=name)

    def plugin_names(self) -> list[str]:
        """Names of the registered plugins, in registration order."""
        return [name for name, _ in self.pm.list_name_plugin()]

    def check_pending(self) -> None:
        """Raise :class:`PluginError` if a plugin implements a hook that has no spec (usually a typo)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            hooks = {n: c for n, c in vars(self.pm.hook).items() if not n.startswith("_")}
            specs = sorted(n for n, c in hooks.items() if c.has_spec())
            problems = []
            for hook_name, caller in hooks.items():
                close = difflib.get_close_matches(hook_name, specs, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                for impl in [] if caller.has_spec() else caller.get_hookimpls():
                    if not impl.optionalhook:
                        problems.append(
                            f"plugin {impl.plugin_name!r} implements unknown hook {hook_name!r}{hint}"
                        )
            raise PluginError("; ".join(problems) + f"; known hooks: {specs}") from exc

    def stages(self) -> dict[str, StageSpec]:
        """All stages registered through ``recsys_register_stages``, keyed by name, ``plugin`` filled in."""
        found: dict[str, StageSpec] = {}

        def register(plugin_name: str, stage: StageSpec) -> None:
            if not isinstance(stage, StageSpec):
                raise PluginError(f"plugin {plugin_name!r} registered {stage!r}, not a StageSpec")
            if stage.name in found:
                raise PluginError(
                    f"stage {stage.name!r} is registered by both plugin {found[stage.name].plugin!r}"
                    f" and plugin {plugin_name!r}"
                )
            found[stage.name] = dataclasses.replace(stage, plugin=plugin_name)

        # Called per implementation, not via pm.hook, so each callback knows which plugin registers.
        for impl in reversed(self.pm.hook.recsys_register_stages.get_hookimpls()):
            _call(impl, {"register": functools.partial(register, impl.plugin_name)})
        return found

    def get_stage(self, stage_name: str) -> StageSpec:
        """The :class:`StageSpec` named ``stage_name``; :class:`PluginError` listing known stages if none."""
        stages = self.stages()
        if stage_name not in stages:
            raise PluginError(f"unknown stage {stage_name!r}; known stages: {sorted(stages)}")
        return stages[stage_name]

    def validate_stage_config(self, stage_name: str, config: dict[str, Any]) -> None:
        """Raise :class:`StageConfigError` with every plugin's messages if any plugin rejects ``config``."""
        self.get_stage(stage_name)
        errors: list[str] = []
        for result in self.pm.hook.recsys_validate_stage_config(stage_name=stage_name, config=config):
            # A bare string would otherwise be split into one "error" per character.
            errors.extend([result] if isinstance(result, str) else result)
        if errors:
            raise StageConfigError(stage_name, errors)

    def build_stage(self, stage_name: str, config: dict[str, Any], context: Any = None) -> Any:
        """Validate ``config``, then return ``factory(config, context)`` of the stage ``stage_name``."""
        stage = self.get_stage(stage_name)
        self.validate_stage_config(stage_name, config)
        return stage.factory(config, context)

    def _chain(self, hook_name: str, value_arg: str, kwargs: dict[str, Any]) -> Any:
        # pluggy's own call keeps only a list of results; chaining needs each output fed to the next
        # implementation, so walk the implementations ourselves in pluggy's call order (reversed list).
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if impl.wrapper or impl.hookwrapper:
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook_name} cannot be a wrapper")
            result = _call(impl, kwargs)
            if result is not None:
                kwargs[value_arg] = result
        return kwargs[value_arg]

    def run_rank(
        self, stage_name: str, request: dict[str, Any], rank: Callable[[dict[str, Any]], Any]
    ) -> Any:
        """Chain ``recsys_before_rank`` over ``request``, call ``rank`` on the result, chain
        ``recsys_after_rank`` over the ranking and return it."""
        request = self._chain("recsys_before_rank", "request", {"stage_name": stage_name, "request": request})
        ranking = rank(request)
        kwargs = {"stage_name": stage_name, "request": request, "ranking": ranking}
        return self._chain("recsys_after_rank", "ranking", kwargs)

    def send_feedback(self, stage_name: str, event: dict[str, Any]) -> list[Any]:
        """Deliver ``event`` to every ``recsys_feedback`` implementation; return their non-None acks."""
        return list(self.pm.hook.recsys_feedback(stage_name=stage_name, event=event))
