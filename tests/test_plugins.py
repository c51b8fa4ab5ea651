"""The plugin manager: built-ins through the entry-point group, allow and block lists."""

from modelkiln.plugins.manager import load_plugins, make_plugin_manager


def test_built_ins_come_through_the_entry_point_group():
    names = {name for name, _ in make_plugin_manager().list_name_plugin()}
    assert {"directory", "formats", "onnxruntime", "torch", "quantize"} <= names


def test_contributions_kiln_steps_runtimes_formats_registry_kinds():
    plugins = load_plugins()
    assert "quantize.int8_dynamic" in plugins.steps  # kiln_steps
    assert {"onnxruntime", "torch"} <= set(plugins.runtimes)  # kiln_runtimes
    assert [f.name for f in plugins.formats][:4] == ["onnx", "huggingface", "safetensors", "state_dict"]  # kiln_checkpoint_formats
    assert "directory" in plugins.registry_kinds  # kiln_registry_kinds


def test_blocklist_and_allowlist():
    assert "quantize.int8_dynamic" not in load_plugins(disabled=["quantize"]).steps
    plugins = load_plugins(enabled=["formats"])
    assert plugins.formats and not plugins.steps
