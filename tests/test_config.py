import re

import pytest

from modelkiln.config import TargetConfig, load_config, write_default_config
from modelkiln.errors import ConfigError


def test_init_writes_the_embedded_defaults(tmp_path):
    path = write_default_config(tmp_path)
    config = load_config(path)
    assert config.registry.kind == "directory"
    assert config.registry_path == tmp_path / "models"
    assert config.store_url == f"sqlite:///{tmp_path / 'kiln.db'}"
    assert config.artifacts_path == tmp_path / "artifacts"
    assert config.promoted_path == tmp_path / "promoted"
    assert list(config.targets) == ["cpu"]
    assert config.targets["cpu"].runtimes == ["onnxruntime", "torch"]
    # The commented file and the dataclass defaults say the same (a file without the key
    # gets the dataclass's value).
    assert config.targets["cpu"] == TargetConfig()
    assert config.policy.max_quality_drop == 0.01
    assert config.registry.quiet_seconds == 2.0
    assert (tmp_path / "models").is_dir()


def test_every_value_the_template_writes_is_the_dataclasses_default():
    """The template writes the defaults out for a reader; the dataclasses are what a file
    without the key gets. Each key the template sets must hold the dataclass's value."""
    import dataclasses
    from pathlib import PurePath

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10, as config.py reads it
        import tomli as tomllib

    from modelkiln.config import DEFAULT_CONFIG_TEMPLATE, Config

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, PurePath) else value

    defaults = plain(dataclasses.asdict(Config()))
    written = tomllib.loads(DEFAULT_CONFIG_TEMPLATE)
    differ = []

    def compare(table, default, where):
        for key, value in table.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                compare(value, default[key], f"{where}{key}.")
            elif key not in default or default[key] != value:
                differ.append(f"{where}{key} = {value!r}, default {default.get(key, 'missing')!r}")

    compare(written, defaults, "")
    assert not differ, "the template and the dataclasses disagree: " + "; ".join(differ)


def test_init_refuses_to_overwrite(tmp_path):
    write_default_config(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        write_default_config(tmp_path)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text("[targets.cpu]\nthread = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "targets.cpu.thread" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text('[workers]\ncount = "two"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "workers.count" in str(err.value) and "int" in str(err.value) and str(path) in str(err.value)


def test_a_bool_is_not_an_int(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text("[workers]\ncount = true\n")
    with pytest.raises(ConfigError, match="workers.count"):
        load_config(path)


def test_invalid_toml_is_one_clear_error(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text("[registry\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="kiln init"):
        load_config(tmp_path / "nope.toml")


def test_kiln_config_environment_variable(tmp_path, monkeypatch):
    path = write_default_config(tmp_path)
    monkeypatch.setenv("KILN_CONFIG", str(path))
    assert load_config(None).source == path


def test_objective_batch_size_must_be_measured(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text("[policy]\nobjective_batch_size = 3\n")
    with pytest.raises(ConfigError, match="objective_batch_size"):
        load_config(path)


def test_factory_must_name_module_and_callable(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text('[architectures.m]\nfactory = "nocolon"\n')
    with pytest.raises(ConfigError, match="module:callable"):
        load_config(path)


def test_the_example_config_is_what_init_writes(tmp_path):
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "kiln.toml"
    assert example.read_text() == write_default_config(tmp_path).read_text()


def test_an_unknown_objective_is_named(tmp_path):
    path = write_default_config(tmp_path)
    path.write_text(path.read_text().replace('objective = "latency_p50_ms"', 'objective = "speed"'))
    with pytest.raises(ConfigError, match="'policy.objective' must be one of latency_p50_ms.*decode_ms_per_token"):
        load_config(path)


def test_a_negative_memory_budget_is_refused(tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text('[targets.cpu]\ndevice = "cpu"\nmemory_mb = -1\n')
    with pytest.raises(ConfigError, match="'targets.cpu.memory_mb' must be 0"):
        load_config(path)


@pytest.mark.parametrize("old, new, message", [
    ("job_timeout_seconds = 1800.0", "job_timeout_seconds = -1.0", "'workers.job_timeout_seconds' must be more than 0"),
    ("lease_seconds = 60.0", "lease_seconds = -5.0", "'workers.lease_seconds' must be more than 0"),
    ("sample_count = 64", "sample_count = 0", "'measure.sample_count' must be at least 1"),
    ("min_runs = 20", "min_runs = 0", "'measure.min_runs' must be at least 1"),
    ("threads = 2", "threads = -1", "'targets.cpu.threads' must be at least 1"),
    ("memory_limit_mb = 0", "memory_limit_mb = -100", "'workers.memory_limit_mb' must be at least 0"),
    ("[targets.cpu]", '[targets."../../../escape"]', "target name '../../../escape' must be"),
    ("budget_minutes = 60.0", "budget_minutes = -1.0", "'policy.budget_minutes' must be 0"),
])
def test_every_number_and_target_name_is_checked(tmp_path, old, new, message):
    path = write_default_config(tmp_path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_a_device_no_runtime_serves_is_a_config_error(config):
    from modelkiln.daemon.service import Daemon

    config.targets["cpu"].device = "cpuu"
    with pytest.raises(ConfigError, match=r"targets.cpu.device 'cpuu' is served by none of its runtimes "
                                          r"\(onnxruntime: cpu; torch: cpu, cuda\)"):
        Daemon(config, preload=False).start()


def test_relative_paths_with_dot_dot_are_normalised(tmp_path):
    """`../shared/models` must compare equal to the paths file-system events report."""
    from modelkiln.config import load_config, write_default_config

    host = tmp_path / "host-a"
    host.mkdir()
    write_default_config(host)
    path = host / "kiln.toml"
    path.write_text(path.read_text().replace('path = "models"', 'path = "../shared/models"', 1)
                    .replace('artifacts = "artifacts"', 'artifacts = "../shared/artifacts"'))
    config = load_config(path)
    assert config.registry_path == tmp_path / "shared" / "models"
    assert config.artifacts_path == tmp_path / "shared" / "artifacts"


def test_the_decode_objective_s_batch_size_is_one_the_targets_decode(tmp_path):
    path = write_default_config(tmp_path)
    text = path.read_text().replace('objective = "latency_p50_ms"', 'objective = "decode_ms_per_token"')
    path.write_text(text.replace("objective_batch_size = 1", "objective_batch_size = 32"))
    assert load_config(path).policy.objective_batch_size == 32  # in decode_batch_sizes, not batch_sizes
    path.write_text(text.replace("objective_batch_size = 1", "objective_batch_size = 64"))
    with pytest.raises(ConfigError, match="add it to the targets' decode_batch_sizes"):
        load_config(path)
    path.write_text(path.read_text().replace("decode_batch_sizes = [1, 8, 32]", "decode_batch_sizes = [0]"))
    with pytest.raises(ConfigError, match="decode_batch_sizes' must list batch sizes"):
        load_config(path)


def test_a_gpu_target_without_recipes_gets_the_gpu_recipes(tmp_path):
    """A cuda target that lists no recipes gets 16-bit, FP8 and int4 variants compiled for
    the GPU, not the CPU's int8 and pruning recipes; every one of them parses."""
    from modelkiln.config import DEFAULT_RECIPES, GPU_RECIPES
    from modelkiln.plugins.manager import load_plugins
    from modelkiln.plugins.recipes import parse_recipe

    path = write_default_config(tmp_path)
    path.write_text(path.read_text() + '\n[targets.gpu]\ndevice = "cuda"\nruntimes = ["torch"]\n')
    config = load_config(path)
    assert config.targets["gpu"].recipes == list(GPU_RECIPES)
    assert config.targets["cpu"].recipes == list(DEFAULT_RECIPES)
    steps = load_plugins().steps
    for text in GPU_RECIPES:
        parse_recipe(text, steps, "targets.gpu.recipes")
