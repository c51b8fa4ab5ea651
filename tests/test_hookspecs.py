"""Meta-tests that keep the plugin API honest: every hook is documented and tested."""

import inspect
from pathlib import Path

from modelkiln.plugins import hookspecs
from modelkiln.plugins.manager import build_catalog, make_plugin_manager

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("kiln_")]
TESTS = Path(__file__).parent


def test_every_hook_is_documented():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40, f"{name} has no docstring"
        params = [p for p in inspect.signature(getattr(hookspecs, name)).parameters]
        for param in params:
            assert f":param {param}:" in doc, f"{name} does not document {param}"
        returns_none = inspect.signature(getattr(hookspecs, name)).return_annotation in (None, "None")
        assert ":returns:" in doc or returns_none, f"{name} does not document what it returns"


def test_every_hook_is_tested():
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    untested = [name for name in HOOKS if name not in sources]
    assert not untested, f"hooks with no test: {untested}"


def test_built_ins_come_through_the_entry_point_group():
    names = {name for name, _ in make_plugin_manager().list_name_plugin()}
    assert {"directory", "formats", "onnxruntime", "torch", "quantize"} <= names


def test_catalog_contributions_kiln_steps_runtimes_formats_registry_kinds():
    catalog = build_catalog()
    assert "quantize.int8_dynamic" in catalog.steps  # kiln_steps
    assert {"onnxruntime", "torch"} <= set(catalog.runtimes)  # kiln_runtimes
    assert [f.name for f in catalog.formats][:4] == ["onnx", "huggingface", "safetensors", "state_dict"]  # kiln_checkpoint_formats
    assert "directory" in catalog.registry_kinds  # kiln_registry_kinds


def test_blocklist_and_allowlist():
    assert "quantize.int8_dynamic" not in build_catalog(disabled=["quantize"]).steps
    catalog = build_catalog(enabled=["formats"])
    assert catalog.formats and not catalog.steps
