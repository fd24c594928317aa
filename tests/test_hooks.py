"""Tests of the recsys plugin contract (``hooks``): registration, loading and hook semantics."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import hooks
import hooks.manager
from hooks import (
    DISABLE_ENTRYPOINTS_ENV,
    ENTRY_POINT_GROUP,
    PluginError,
    RecsysPluginManager,
    StageConfigError,
    StageSpec,
    hookimpl,
)
from tests.plugins import audit, business_rules, echo_stage, misspelt


def make_manager(*builtins, **kwargs) -> RecsysPluginManager:
    # Never pick up whatever happens to be installed in the environment unless a test asks for it.
    kwargs.setdefault("load_entrypoints", False)
    return RecsysPluginManager(builtins=builtins, **kwargs)


def fake_entry_points(monkeypatch, *eps: tuple[str, str]) -> list[str]:
    """Make the manager see only ``eps`` as (name, module) entry points; returns the groups asked for."""
    calls: list[str] = []

    def entry_points(group):
        calls.append(group)
        return [EntryPoint(name=name, value=value, group=group) for name, value in eps]

    monkeypatch.setattr(hooks.manager, "entry_points", entry_points)
    return calls


class Validator:
    """A second plugin with opinions on ``echo_ranker``'s config."""

    @hookimpl
    def recsys_validate_stage_config(self, stage_name, config):
        return ["no debugging in production"] if config.get("debug") else None


# -- registration ---------------------------------------------------------------------------------


def test_builtins_are_registered_in_order_under_their_names():
    pm = make_manager(business_rules, ("echo", echo_stage), Validator())
    assert pm.plugin_names() == ["tests.plugins.business_rules", "echo", "Validator"]


def test_register_and_unregister_programmatically():
    pm = make_manager()
    assert pm.register(echo_stage, name="echo") == "echo"
    assert list(pm.stages()) == ["echo_ranker"]
    assert pm.unregister("echo") is echo_stage
    assert pm.plugin_names() == []
    assert pm.stages() == {}
    with pytest.raises(PluginError, match="no plugin named 'echo'"):
        pm.unregister("echo")


def test_register_rejects_a_taken_name():
    pm = make_manager(("rules", business_rules))
    with pytest.raises(PluginError, match="cannot register plugin 'rules'"):
        pm.register(audit, name="rules")
    assert pm.pm.get_plugin("rules") is business_rules


def test_hookimpl_with_arguments_not_in_the_spec_is_rejected():
    class WrongArgs:
        @hookimpl
        def recsys_feedback(self, stage, event):
            return None

    with pytest.raises(PluginError, match="'WrongArgs' does not match the recsys hook specs"):
        make_manager(WrongArgs())


def test_misspelt_hook_fails_loudly_at_construction():
    with pytest.raises(PluginError) as excinfo:
        make_manager(echo_stage, misspelt)
    message = str(excinfo.value)
    assert "plugin 'tests.plugins.misspelt' implements unknown hook 'recsys_regster_stages'" in message
    assert "did you mean 'recsys_register_stages'?" in message
    assert isinstance(excinfo.value.__cause__, hooks.manager.pluggy.PluginValidationError)


def test_registering_a_misspelt_plugin_leaves_the_manager_unchanged():
    pm = make_manager(echo_stage)
    with pytest.raises(PluginError, match="recsys_regster_stages"):
        pm.register(misspelt)
    assert pm.plugin_names() == ["tests.plugins.echo_stage"]
    pm.check_pending()  # the half-registered plugin must not linger


# -- enable / disable -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["rules", "audit", "echo"]),
        ({"enabled": ["echo", "rules"]}, ["rules", "echo"]),
        ({"disabled": ["audit"]}, ["rules", "echo"]),
        ({"enabled": ["rules", "audit"], "disabled": ["audit"]}, ["rules"]),
    ],
)
def test_enabled_and_disabled_lists_select_plugins(kwargs, expected):
    pm = make_manager(("rules", business_rules), ("audit", audit), ("echo", echo_stage), **kwargs)
    assert pm.plugin_names() == expected


@pytest.mark.parametrize("which", ["enabled", "disabled"])
def test_unknown_name_in_enable_lists_is_an_error(which):
    with pytest.raises(PluginError) as excinfo:
        make_manager(("rules", business_rules), ("echo", echo_stage), **{which: ["rulez"]})
    assert "unknown plugin 'rulez'" in str(excinfo.value)
    assert "['rules', 'echo']" in str(excinfo.value)


def test_disabling_a_misspelt_plugin_avoids_the_error():
    pm = make_manager(("echo", echo_stage), ("typo", misspelt), disabled=["typo"])
    assert pm.plugin_names() == ["echo"]


# -- entry points ---------------------------------------------------------------------------------


def test_entry_points_are_loaded_after_builtins_under_their_names(monkeypatch):
    monkeypatch.delenv(DISABLE_ENTRYPOINTS_ENV, raising=False)
    calls = fake_entry_points(monkeypatch, ("rules", "tests.plugins.business_rules"))
    pm = RecsysPluginManager(builtins=[("echo", echo_stage)])
    assert calls == [ENTRY_POINT_GROUP]
    assert pm.plugin_names() == ["echo", "rules"]
    assert pm.pm.get_plugin("rules") is business_rules


def test_entry_point_of_an_already_registered_builtin_is_not_registered_twice(monkeypatch):
    fake_entry_points(monkeypatch, ("echo_ep", "tests.plugins.echo_stage"))
    pm = make_manager(("echo", echo_stage), load_entrypoints=True)
    assert pm.plugin_names() == ["echo"]


def test_entry_point_names_can_be_enabled_and_disabled(monkeypatch):
    fake_entry_points(
        monkeypatch, ("rules", "tests.plugins.business_rules"), ("audit", "tests.plugins.audit")
    )
    pm = make_manager(load_entrypoints=True, disabled=["rules"])
    assert pm.plugin_names() == ["audit"]


def test_entry_point_that_fails_to_import_names_the_entry_point(monkeypatch):
    fake_entry_points(monkeypatch, ("broken", "tests.plugins.no_such_module"))
    with pytest.raises(PluginError) as excinfo:
        make_manager(load_entrypoints=True)
    assert "entry point 'broken'" in str(excinfo.value)
    assert "No module named 'tests.plugins.no_such_module'" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


def test_disabled_entry_point_is_never_imported(monkeypatch):
    fake_entry_points(
        monkeypatch, ("broken", "tests.plugins.no_such_module"), ("audit", "tests.plugins.audit")
    )
    pm = make_manager(load_entrypoints=True, disabled=["broken"])
    assert pm.plugin_names() == ["audit"]


@pytest.mark.parametrize(("value", "loads"), [("1", False), ("true", False), (" YES ", False), ("0", True)])
def test_env_var_turns_entry_point_loading_off(monkeypatch, value, loads):
    monkeypatch.setenv(DISABLE_ENTRYPOINTS_ENV, value)
    calls = fake_entry_points(monkeypatch, ("rules", "tests.plugins.business_rules"))
    pm = RecsysPluginManager()
    assert pm.plugin_names() == (["rules"] if loads else [])
    assert calls == ([ENTRY_POINT_GROUP] if loads else [])


def test_explicit_load_entrypoints_overrides_the_env_var(monkeypatch):
    monkeypatch.setenv(DISABLE_ENTRYPOINTS_ENV, "1")
    fake_entry_points(monkeypatch, ("rules", "tests.plugins.business_rules"))
    assert RecsysPluginManager(load_entrypoints=True).plugin_names() == ["rules"]
    monkeypatch.setenv(DISABLE_ENTRYPOINTS_ENV, "0")
    assert RecsysPluginManager(load_entrypoints=False).plugin_names() == []


# -- stages ---------------------------------------------------------------------------------------


def test_stages_are_collected_with_the_registering_plugin_filled_in():
    pm = make_manager(business_rules, ("echo", echo_stage))
    stage = pm.stages()["echo_ranker"]
    assert (stage.name, stage.kind, stage.final, stage.plugin) == ("echo_ranker", "ranking", True, "echo")
    assert stage.factory is echo_stage.EchoRanker


def test_duplicate_stage_name_names_both_plugins():
    class Clone:
        @hookimpl
        def recsys_register_stages(self, register):
            register(StageSpec(name="echo_ranker", factory=dict, kind="filter"))

    pm = make_manager(("echo", echo_stage), ("clone", Clone()))
    with pytest.raises(
        PluginError, match="'echo_ranker' is registered by both plugin 'clone' and plugin 'echo'"
    ):
        pm.stages()


def test_register_callback_rejects_anything_but_a_stagespec():
    class Sloppy:
        @hookimpl
        def recsys_register_stages(self, register):
            register({"name": "dict_stage"})

    with pytest.raises(PluginError, match="plugin 'Sloppy' registered .*not a StageSpec"):
        make_manager(Sloppy()).stages()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "reranking"}, "kind must be one of"),
        ({"kind": "filter", "final": True}, "only a 'ranking' stage can be final"),
        ({"name": ""}, "non-empty string"),
        ({"factory": "EchoRanker"}, "factory must be callable"),
    ],
)
def test_stagespec_rejects_invalid_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StageSpec(**{"name": "s", "factory": dict, **kwargs})


def test_validation_gathers_the_messages_of_every_plugin():
    pm = make_manager(echo_stage, Validator())
    pm.validate_stage_config("echo_ranker", {"top_k": 5})
    with pytest.raises(StageConfigError) as excinfo:
        pm.validate_stage_config("echo_ranker", {"top_k": 0, "debug": True})
    assert isinstance(excinfo.value, ValueError)
    assert sorted(excinfo.value.errors) == [
        "no debugging in production",
        "top_k must be a positive integer, got 0",
        "unknown key 'debug'",
    ]
    assert str(excinfo.value).startswith("invalid config for stage 'echo_ranker': ")
    assert "unknown key 'debug'" in str(excinfo.value)


def test_validating_an_unknown_stage_lists_the_known_ones():
    pm = make_manager(echo_stage)
    with pytest.raises(PluginError, match=r"unknown stage 'echo'; known stages: \['echo_ranker'\]"):
        pm.validate_stage_config("echo", {})


def test_build_stage_validates_then_calls_the_factory_with_the_context():
    pm = make_manager(echo_stage)
    context = object()
    ranker = pm.build_stage("echo_ranker", {"top_k": 2}, context)
    assert isinstance(ranker, echo_stage.EchoRanker)
    assert (ranker.top_k, ranker.context) == (2, context)
    with pytest.raises(StageConfigError, match="top_k must be a positive integer"):
        pm.build_stage("echo_ranker", {"top_k": -1})


# -- ranking and feedback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builtins", "order"),
    [
        ((business_rules, audit), ["audit", "business_rules"]),
        ((audit, business_rules), ["business_rules", "audit"]),
    ],
)
def test_before_and_after_rank_are_chained_in_call_order(builtins, order):
    pm = make_manager(echo_stage, *builtins)
    ranker = pm.build_stage("echo_ranker", {"top_k": 10})
    seen = []

    def rank(request):
        seen.append(request)
        return ranker.rank(request)

    request = {"candidates": [1, 2, 3], "blocked": [2]}
    ranking = pm.run_rank("echo_ranker", request, rank)
    # pluggy calls the last registered plugin first; each one sees the previous one's output.
    assert seen == [{"candidates": [1, 3], "blocked": [2], "trace": order}]
    assert ranking == {"items": [1, 3], "tags": order}
    assert request == {"candidates": [1, 2, 3], "blocked": [2]}


def test_hooks_returning_none_leave_request_and_ranking_untouched():
    class Observer:
        def __init__(self):
            self.seen = []

        @hookimpl
        def recsys_before_rank(self, stage_name, request):
            self.seen.append(("before", stage_name))

        @hookimpl
        def recsys_after_rank(self, stage_name, ranking):
            self.seen.append(("after", stage_name))

    observer = Observer()
    pm = make_manager(observer)
    request, ranking = {"candidates": [7]}, ["the", "ranking"]
    assert pm.run_rank("any", request, lambda r: ranking if r is request else None) is ranking
    assert observer.seen == [("before", "any"), ("after", "any")]


def test_wrappers_are_refused_on_chained_hooks():
    class Wrapper:
        @hookimpl(wrapper=True)
        def recsys_before_rank(self, request):
            return (yield)

    pm = make_manager(("wrapper", Wrapper()))
    with pytest.raises(PluginError, match="'wrapper': recsys_before_rank cannot be a wrapper"):
        pm.run_rank("s", {}, lambda r: r)


def test_feedback_returns_the_acknowledgements_of_the_stage_owner():
    class Counter:
        def __init__(self):
            self.events = []

        @hookimpl
        def recsys_feedback(self, event):
            self.events.append(event)

    counter = Counter()
    pm = make_manager(echo_stage, counter)
    event = {"id": 42, "item": 3, "type": "click"}
    assert pm.send_feedback("echo_ranker", event) == [{"acked": 42}]
    assert pm.send_feedback("other_stage", event) == []
    assert counter.events == [event, event]


# -- the contract itself --------------------------------------------------------------------------


def test_contract_constants():
    assert (hooks.PROJECT_NAME, hooks.ENTRY_POINT_GROUP) == ("recsys", "recsys.plugins")
    assert DISABLE_ENTRYPOINTS_ENV == "RECSYS_DISABLE_ENTRYPOINTS"
    assert hooks.hookspec.project_name == hooks.hookimpl.project_name == "recsys"
    assert issubclass(StageConfigError, PluginError)


def test_contract_imports_only_stdlib_and_pluggy():
    code = (
        "import sys; before = set(sys.modules); import hooks; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'hooks', 'pluggy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
