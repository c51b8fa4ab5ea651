"""The plugin manager: built-ins through the entry-point group, allow and block lists,
contributions from third parties, pluggy's calling order, and a broken or misspelled
plugin isolated by name."""

import pytest

from modelkiln.plugins import hookimpl
from modelkiln.plugins.api import Runtime, Step
from modelkiln.plugins.manager import call_each, first_result, load_plugins, make_plugin_manager, notify


def test_built_ins_come_through_the_entry_point_group():
    manager = make_plugin_manager()
    names = {name for name, _ in manager.list_name_plugin()}
    assert {"directory", "formats", "onnxruntime", "torch", "quantize"} <= names
    # Where each came from, as pluggy records it for entry points.
    assert {dist.project_name for _, dist in manager.list_plugin_distinfo()} == {"modelkiln"}


def test_contributions_of_the_built_ins():
    plugins = load_plugins()
    assert "quantize.int8_dynamic" in plugins.steps
    assert {"onnxruntime", "torch"} <= set(plugins.runtimes)
    assert [f.name for f in plugins.formats][:4] == ["onnx", "huggingface", "safetensors", "state_dict"]
    assert {"directory", "mlflow"} <= set(plugins.registry_kinds)
    assert {p.name: p.distribution for p in plugins.loaded}["quantize"] == "modelkiln"


def test_blocklist_and_allowlist():
    assert "quantize.int8_dynamic" not in load_plugins(disabled=["quantize"]).steps
    plugins = load_plugins(enabled=["formats"])
    assert plugins.formats and not plugins.steps


class Identity(Step):
    name = "identity.copy"
    forms = {"torch": "torch"}

    def apply(self, model, params, context):
        return model


class Abacus(Runtime):
    name = "abacus"


class Extras:
    """A third party's plugin contributing one of each kind, and a step whose name a
    built-in has already taken."""

    __name__ = "extras"

    class Quantize(Step):
        name = "quantize.int8_dynamic"

    @hookimpl(tryfirst=True)  # asked first, and still no taker of a built-in's name
    def kiln_steps(self):
        return [Identity(), self.Quantize()]

    @hookimpl
    def kiln_runtimes(self):
        return [Abacus()]

    @hookimpl
    def kiln_checkpoint_formats(self):
        return []

    @hookimpl
    def kiln_registry_kinds(self):
        return {"tape": object}


@pytest.mark.hooks("kiln_runtimes")
def test_a_plugin_contributes_steps_runtimes_and_registry_kinds_and_built_ins_keep_their_names():
    plugins = load_plugins(extra_plugins=[Extras()])
    assert plugins.steps["identity.copy"].plugin == "extras"
    assert plugins.steps["quantize.int8_dynamic"].plugin == "quantize"  # the first provider wins
    assert plugins.runtimes["abacus"].plugin == "extras"
    assert plugins.registry_kinds["tape"] is object
    assert "kiln_runtimes" in {p.name: p for p in plugins.loaded}["extras"].hooks


class Broken:
    __name__ = "broken"

    @hookimpl
    def kiln_steps(self):
        raise RuntimeError("cannot list my steps")


class Wrapping:
    __name__ = "wrapping"

    @hookimpl(wrapper=True)
    def kiln_variant_ended(self, variant):
        return (yield)


def test_a_broken_or_wrapping_plugin_is_reported_by_name_and_the_rest_load():
    plugins = load_plugins(extra_plugins=[Broken(), Wrapping()])
    assert "quantize.int8_dynamic" in plugins.steps
    assert "cannot list my steps" in plugins.errors["broken"]
    # A hook wrapper would wrap a call the manager never makes (it calls each plugin on
    # its own), so it is refused at registration rather than silently never run.
    assert "wrapper" in plugins.errors["wrapping"]
    assert "wrapping" not in {p.name for p in plugins.loaded}


def test_an_event_hook_that_raises_is_skipped_and_the_others_still_hear_it():
    heard = []

    class Listener:
        __name__ = "listener"

        @hookimpl
        def kiln_job_failed(self, job):
            heard.append(job["id"])

    class Raising:
        __name__ = "raising"

        @hookimpl
        def kiln_job_failed(self, job):
            raise RuntimeError("boom")

    plugins = load_plugins(extra_plugins=[Raising(), Listener()])
    notify(plugins.manager, "kiln_job_failed", job={"id": 7})
    assert heard == [7]


def _listener(name, heard, **marks):
    class Listener:
        __name__ = name

        @hookimpl(**marks)
        def kiln_job_failed(self, job):
            heard.append(name)

        @hookimpl(**marks)
        def kiln_choose_variant(self, candidates, policy):
            return {"chosen by": name}

    return Listener()


def test_hooks_run_in_pluggys_order_tryfirst_first_trylast_last_else_newest_first():
    heard: list[str] = []
    plugins = [_listener("early", heard, tryfirst=True), _listener("first", heard), _listener("late", heard, trylast=True),
               _listener("second", heard)]
    manager = load_plugins(enabled=["early", "first", "late", "second"], extra_plugins=plugins).manager
    notify(manager, "kiln_job_failed", job={"id": 1})
    assert heard == ["early", "second", "first", "late"]
    heard.clear()
    manager.hook.kiln_job_failed(job={"id": 1})  # pluggy's own call, for comparison
    assert heard == ["early", "second", "first", "late"]
    assert first_result(manager, "kiln_choose_variant", candidates=[], policy=None) == ("early", {"chosen by": "early"})
    assert manager.hook.kiln_choose_variant(candidates=[], policy=None) == {"chosen by": "early"}


def test_a_plugin_that_raises_does_not_break_the_order_for_the_rest():
    heard: list[str] = []

    class Raising:
        __name__ = "raising"

        @hookimpl(tryfirst=True)
        def kiln_job_failed(self, job):
            raise RuntimeError("boom")

    errors: dict = {}
    manager = load_plugins(enabled=["first", "raising", "second"],
                           extra_plugins=[_listener("first", heard), Raising(), _listener("second", heard)]).manager
    assert [name for name, _ in call_each(manager, "kiln_job_failed", errors=errors, job={"id": 1})] == ["second", "first"]
    assert errors == {"raising": "kiln_job_failed: RuntimeError: boom"}


class Misspelled:
    __name__ = "misspelled"

    @hookimpl
    def kiln_stpes(self):
        return []


class WrongArgument:
    __name__ = "wrong_argument"

    @hookimpl
    def kiln_job_failed(self, failed_job):
        pass


class FromANewerModelkiln:
    """A hook of a newer modelkiln, marked optional: loads, and is never called here."""

    __name__ = "newer"

    @hookimpl(optionalhook=True)
    def kiln_from_the_future(self):
        return []


def test_a_misspelled_hook_refuses_its_plugin_alone_with_the_name_and_reason():
    plugins = load_plugins(extra_plugins=[Misspelled(), WrongArgument(), FromANewerModelkiln(), Extras()])
    assert "kiln_stpes" in plugins.errors["misspelled"] and "unknown hook" in plugins.errors["misspelled"]
    assert "failed_job" in plugins.errors["wrong_argument"]
    loaded = {p.name for p in plugins.loaded}
    assert not {"misspelled", "wrong_argument"} & loaded
    assert {"newer", "extras", "quantize"} <= loaded and "newer" not in plugins.errors
    assert plugins.steps["identity.copy"].plugin == "extras"  # the good plugin beside them loaded


@pytest.mark.hooks("kiln_job_failed")
def test_event_payloads_match_their_typed_dicts():
    """The payloads the daemon builds are checked against the TypedDicts where a daemon
    runs (tests/test_pipeline.py); here the checker itself refuses what breaks them."""
    from helpers import assert_payload

    from modelkiln.plugins.api import JobEvent

    job = {"id": 3, "kind": "inspect", "model": "m", "version": "1", "target": None, "variant": None,
           "attempts": 1, "reason": "boom"}
    assert_payload(job, JobEvent)
    for broken in ({**job, "attempts": True}, {**job, "extra": 1}, {k: v for k, v in job.items() if k != "id"}):
        with pytest.raises(AssertionError):
            assert_payload(broken, JobEvent)
