"""The plugin manager: built-ins through the entry-point group, allow and block lists."""

from modelkiln.plugins.manager import build_catalog, make_plugin_manager


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
