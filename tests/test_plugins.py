"""The plugin manager: built-ins through the entry-point group, allow and block lists,
contributions from third parties, and a broken plugin isolated by name."""

import pytest

from modelkiln.plugins import hookimpl
from modelkiln.plugins.api import Runtime, Step
from modelkiln.plugins.manager import load_plugins, make_plugin_manager, notify


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

    @hookimpl
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
