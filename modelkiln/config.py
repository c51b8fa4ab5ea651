"""Typed configuration read from one TOML file.

Every section is a dataclass; ``load_config`` checks each key against the dataclass
fields so that a typo or a wrong type is one clear error naming the key and the file,
instead of a silently ignored setting on a service nobody watches.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "KILN_CONFIG"
# Log line formats (``daemon/logs.py`` writes them).
LOG_FORMATS = ("text", "json")
# What the policy may minimise; the decode objectives are read from the decode figures
# of causal language models (batch 1).
DECODE_OBJECTIVES = ("decode_ms_per_token", "prefill_ms")
# Read from the load figures (targets.<name>.concurrency): the most requests per second
# whose p95 stays within policy.p95_limit_ms.
LOAD_OBJECTIVE = "throughput_at_p95_ms"
OBJECTIVES = ("latency_p50_ms", "latency_p95_ms", *DECODE_OBJECTIVES, LOAD_OBJECTIVE)


@dataclass
class MlflowConfig:
    """The MLflow Model Registry as the source of checkpoints (``registry.kind = "mlflow"``)."""

    tracking_uri: str = ""
    # Where registered models live; empty: the tracking server's.
    registry_uri: str = ""
    # Registered models to follow by name, and/or an MLflow search filter over
    # registered models (e.g. "name LIKE 'prod-%'"). Both empty: every registered model.
    models: list[str] = field(default_factory=list)
    filter: str = ""
    poll_seconds: float = 60.0
    # On promotion: the variant is registered as a version of the derived model, this
    # alias (with {target}) is set on that version, and the measurements of every variant
    # are logged as one run (with a child run per variant) in the experiment.
    alias: str = "kiln-{target}"
    derived_model: str = "{model}-kiln-{target}"
    experiment: str = "modelkiln"


@dataclass
class RegistryConfig:
    kind: str = "directory"
    # The directory registry's folder; for the mlflow registry, the local cache that
    # model versions are downloaded into.
    path: Path = Path("models")
    quiet_seconds: float = 2.0
    rescan_seconds: float = 60.0
    # A version folder larger than this (apparent size: sparse files count in full) is
    # refused before it is copied; 0: no cap beyond the free disk space.
    max_checkpoint_gb: float = 100.0
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class StoreConfig:
    # A SQLAlchemy URL; a bare path is taken as a SQLite file.
    url: str = "kiln.db"
    busy_timeout_ms: int = 30000


@dataclass
class PathsConfig:
    artifacts: Path = Path("artifacts")
    promoted: Path = Path("promoted")


@dataclass
class WorkersConfig:
    count: int = 1
    job_timeout_seconds: float = 1800.0
    lease_seconds: float = 60.0
    max_attempts: int = 3
    # Address-space limit of each worker process in MiB; 0: three quarters of the host's
    # memory (or its cgroup's limit) shared among the workers.
    memory_limit_mb: int = 0


@dataclass
class MeasureConfig:
    warmup_runs: int = 5
    min_runs: int = 20
    # Runs continue in windows until the median moves by less than this fraction.
    stability: float = 0.02
    # Timed runs per batch size last at least min_seconds and at most max_seconds.
    min_seconds: float = 0.5
    max_seconds: float = 3.0
    sample_count: int = 64
    # A variant whose runs at the policy's batch size are, by a sequential test, over this
    # many times both the served variant's and its baseline's p50 ends its measurement
    # there (recorded with its figures and the reason). 0: every variant is timed in full.
    give_up_margin: float = 3.0


# Each quantization; prune then quantize; distill then quantize; shard where the target
# has several devices. The baseline competes too: a step must earn its promotion.
DEFAULT_RECIPES = (
    "baseline",
    "quantize.int8_dynamic",
    "quantize.int8_static",
    "quantize.bf16",
    "compile.onnxruntime",
    "prune.structured -> quantize.int8_dynamic",
    "distill.depth -> quantize.int8_dynamic",
    "shard.tensor_parallel",
    "shard.size_capped",
)

# A cuda target's recipes where its table lists none: 16-bit, FP8 and int4 weights, each
# compiled with CUDA graphs (what a GPU serves fast); steps a GPU does not take (its
# compute capability) are skipped with the reason.
GPU_RECIPES = (
    "baseline",
    "quantize.bf16 -> compile.inductor",
    "quantize.bf16 -> quantize.fp8 -> compile.inductor",
    "quantize.bf16 -> quantize.fp8_weight_only -> compile.inductor",
    "quantize.bf16 -> quantize.weight_only(block_size=128) -> compile.inductor",
    "shard.tensor_parallel -> compile.inductor",
)


@dataclass
class TargetConfig:
    device: str = "cpu"
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime", "torch"])
    threads: int = 2
    # Devices one variant may span: ranks of a tensor-parallel (shard) variant. On cpu
    # each rank is a process and the target's threads are shared among them.
    devices: int = 1
    # Memory one variant's weights may hold at once, MiB (0: no budget). Variants over it
    # are not promoted; a model larger than it gets a streamed variant (shard.size_capped).
    memory_mb: int = 0
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    # Concurrent clients each variant is also measured under (closed loop, one request at
    # a time each, batch 1): throughput and latency at every level. Empty: not measured.
    concurrency: list[int] = field(default_factory=list)
    # Causal language models only: sequences decoded at once (each with its own KV cache)
    # and prompt lengths prefilled, as a server runs them.
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    prefill_tokens: list[int] = field(default_factory=lambda: [512, 2048])
    # Absent (or empty): DEFAULT_RECIPES, or GPU_RECIPES on a cuda device.
    recipes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.recipes:
            self.recipes = list(GPU_RECIPES if self.device.startswith("cuda") else DEFAULT_RECIPES)


@dataclass
class PolicyConfig:
    # Largest accepted quality drop, relative to the baseline (0.01 = 1%).
    max_quality_drop: float = 0.01
    # Largest drop of the worst sample's quality (cosine metrics), relative to the baseline:
    # the mean may hide one sentence a variant gets wrong.
    max_sample_drop: float = 0.05
    # Least cosine between a sample's output alone and in a padded batch (masked models):
    # below it a variant's answer depends on what it is batched with.
    min_batch_agreement: float = 0.999
    # The drop's upper confidence bound (a bootstrap of the per-sample differences) must be
    # within max_quality_drop too, not only its mean (0: the mean alone).
    confidence: float = 0.95
    # A variant whose steps trained on the checkpoint's data is promoted only when at least
    # this many distinct rows it never saw judge it (0: no such rule).
    min_heldout_rows: int = 64
    objective: str = "latency_p50_ms"
    objective_batch_size: int = 1
    # Eligible variants whose objective is within this share of the best one's are timed
    # again, interleaved in one process, and that run-off decides (0: no run-off).
    runoff_margin: float = 0.25
    # Wall-clock minutes within which a checkpoint's variant jobs may start, counted from
    # its inspection; later ones are skipped with the reason (0: no budget).
    budget_minutes: float = 60.0
    # For objective throughput_at_p95_ms: the p95 latency a load level must keep (0: any).
    p95_limit_ms: float = 0.0


@dataclass
class ImagesConfig:
    """How a model's image files (``calibration/``, ``eval/``, ``train/`` folders of PNG or
    JPEG) become its input: each is read with Pillow, converted to ``channels``, resized
    to ``size`` ([height, width]; empty: as shipped), divided by ``scale``, less ``mean``
    and over ``std`` per channel, and laid out as ``layout`` for ``input``."""

    input: str = ""  # empty: the model's only input
    size: list[int] = field(default_factory=list)
    scale: float = 255.0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    channels: str = "RGB"  # RGB, BGR or L (grey)
    layout: str = "NCHW"  # or NHWC


@dataclass
class ArchitectureConfig:
    """What the daemon's config says of one model: how to build a module for weights that
    carry no architecture (safetensors, state dicts), and how its image files become
    inputs (``images``)."""

    factory: str = ""
    input_shape: list[int] = field(default_factory=list)
    input_dtype: str = "float32"
    images: ImagesConfig | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "ArchitectureConfig":
        """From ``dataclasses.asdict`` of one (what a worker's spec carries)."""
        images = data.get("images")
        return cls(**{**data, "images": ImagesConfig(**images) if images else None})


@dataclass
class PluginsConfig:
    # Empty ``enabled`` means every installed plugin; ``disabled`` always wins.
    enabled: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    # [plugins.settings.<plugin>]: each plugin's own table, checked by the plugin itself.
    settings: dict[str, dict] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    level: str = "INFO"
    # "text" or "json" (one object per line); both name model, version, target and job.
    format: str = "text"


@dataclass
class HttpConfig:
    # host:port of /healthz and /metrics (Prometheus); empty turns the endpoint off.
    address: str = "127.0.0.1:9464"


@dataclass
class Config:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    targets: dict[str, TargetConfig] = field(default_factory=lambda: {"cpu": TargetConfig()})
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    architectures: dict[str, ArchitectureConfig] = field(default_factory=dict)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    # Where the file was read from; relative paths in it are relative to its folder.
    source: Path | None = None

    @property
    def store_url(self) -> str:
        url = self.store.url
        if "://" in url:
            return url
        return f"sqlite:///{self._resolve(Path(url))}"

    @property
    def store_shown(self) -> str:
        """``store_url`` as messages show it: a password in it replaced by ``***``."""
        return re.sub(r"^([a-z0-9+]+://[^:/@]*:)[^@]*@", r"\1***@", self.store_url)

    @property
    def registry_path(self) -> Path:
        return self._resolve(self.registry.path)

    @property
    def artifacts_path(self) -> Path:
        return self._resolve(self.paths.artifacts)

    @property
    def promoted_path(self) -> Path:
        return self._resolve(self.paths.promoted)

    def _resolve(self, path: Path) -> Path:
        path = Path(os.path.expanduser(str(path)))
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        # Normalised: "../shared/models" must compare equal to the paths file-system events
        # report for it.
        return Path(os.path.normpath(path.absolute()))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, file: Path | None):
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], key, file)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{file}: '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: '{key}' must be a table")
        return {name: _coerce(v, value_tp, f"{key}.{name}", file) for name, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: '{key}' must be a table")
        return _build(tp, value, key, file)
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: '{key}' must be a path string")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"{file}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls, data: dict, prefix: str, file: Path | None):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{file}: unknown key '{full}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], full, file)
    return cls(**kwargs)


def plugin_settings(cls, table: dict, plugin: str, file: Path | None):
    """``[plugins.settings.<plugin>]`` as the dataclass ``cls``, checked the way the rest
    of the config is (unknown keys, types, the same messages). For plugins: what a
    plugin checks beyond that is its own."""
    return _build(cls, table, f"plugins.settings.{plugin}", file)


def _validate(config: Config, file: Path) -> None:
    """Refuse a config that cannot run, naming the file and the key; changes nothing."""
    _validate_sources(config, file)
    _validate_numbers(config, file)
    _validate_targets(config, file)
    _validate_policy(config, file)
    for name, arch in config.architectures.items():
        if arch.factory and ":" not in arch.factory:
            raise ConfigError(
                f"{file}: 'architectures.{name}.factory' must be 'module:callable', "
                f"got {arch.factory!r}"
            )
        if arch.images is not None:
            _validate_images(arch.images, f"architectures.{name}.images", file)


def _validate_images(images: ImagesConfig, key: str, file: Path) -> None:
    channels = {"RGB": 3, "BGR": 3, "L": 1}.get(images.channels)
    if channels is None:
        raise ConfigError(f"{file}: '{key}.channels' must be RGB, BGR or L, got {images.channels!r}")
    if images.layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"{file}: '{key}.layout' must be NCHW or NHWC, got {images.layout!r}")
    if images.size and (len(images.size) != 2 or min(images.size) < 1):
        raise ConfigError(f"{file}: '{key}.size' must be [height, width], got {images.size}")
    if images.scale <= 0:
        raise ConfigError(f"{file}: '{key}.scale' must be above 0, got {images.scale}")
    for what, values in (("mean", images.mean), ("std", images.std)):
        if values and len(values) not in (1, channels):
            raise ConfigError(f"{file}: '{key}.{what}' must hold 1 or {channels} values for {images.channels}, "
                              f"got {len(values)}")
    if any(value <= 0 for value in images.std):
        raise ConfigError(f"{file}: '{key}.std' must be above 0, got {images.std}")


def _normalize(config: Config) -> None:
    """What a valid config is read as: each load level measured once, fewest clients first."""
    for target in config.targets.values():
        target.concurrency = sorted(set(target.concurrency))


def _validate_sources(config: Config, file: Path) -> None:
    """Where checkpoints come from and where the daemon reports to."""
    if config.registry.kind == "mlflow" and not config.registry.mlflow.tracking_uri:
        raise ConfigError(f"{file}: registry.kind is \"mlflow\" but 'registry.mlflow.tracking_uri' is empty: "
                          "set it to the tracking server's URL, e.g. \"http://127.0.0.1:5000\"")
    for key in ("alias", "derived_model"):
        text = getattr(config.registry.mlflow, key)
        try:
            text.format(model="m", target="t")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"{file}: 'registry.mlflow.{key}' = {text!r} may only use {{model}} and "
                              "{target}") from None
    if config.logging.format not in LOG_FORMATS:
        raise ConfigError(f"{file}: 'logging.format' must be one of {', '.join(LOG_FORMATS)}, "
                          f"got {config.logging.format!r}")
    if config.http.address:
        host, _, port = config.http.address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{file}: 'http.address' must be host:port (e.g. \"127.0.0.1:9464\") or \"\" "
                              f"to turn the endpoint off, got {config.http.address!r}")


def _validate_numbers(config: Config, file: Path) -> None:
    for key, value, low, inclusive in _ranges(config):
        if value < low or (value == low and not inclusive):
            raise ConfigError(f"{file}: '{key}' must be {'at least' if inclusive else 'more than'} {low:g}, "
                              f"got {value!r}")
    if 0 < config.measure.give_up_margin < 1:
        raise ConfigError(f"{file}: 'measure.give_up_margin' ({config.measure.give_up_margin:g}) would end the "
                          "measurement of variants faster than the served one; use 0 (off) or a margin of 1 or more")
    if config.measure.max_seconds < config.measure.min_seconds:
        raise ConfigError(f"{file}: 'measure.max_seconds' ({config.measure.max_seconds:g}) is below "
                          f"'measure.min_seconds' ({config.measure.min_seconds:g})")


def _validate_targets(config: Config, file: Path) -> None:
    if not config.targets:
        raise ConfigError(f"{file}: at least one [targets.NAME] table is needed")
    for name, target in config.targets.items():
        # A target's name becomes a folder and a link under promoted/<model>/.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name:
            raise ConfigError(f"{file}: target name {name!r} must be letters, digits, '.', '_' or '-' (it names "
                              "the folder promoted/<model>/<target>)")
        if target.threads < 1:
            raise ConfigError(f"{file}: 'targets.{name}.threads' must be at least 1, got {target.threads}")
        if not target.runtimes:
            raise ConfigError(f"{file}: 'targets.{name}.runtimes' must name at least one runtime")
        if not target.batch_sizes or min(target.batch_sizes) < 1:
            raise ConfigError(f"{file}: 'targets.{name}.batch_sizes' must be positive integers")
        if target.devices < 1:
            raise ConfigError(f"{file}: 'targets.{name}.devices' must be at least 1")
        if target.memory_mb < 0:
            raise ConfigError(f"{file}: 'targets.{name}.memory_mb' must be 0 (no budget) or a size in MiB")
        if any(not 1 <= level <= 256 for level in target.concurrency):
            raise ConfigError(f"{file}: 'targets.{name}.concurrency' must list client counts from 1 to 256")
        if any(not 1 <= batch <= 1024 for batch in target.decode_batch_sizes):
            raise ConfigError(f"{file}: 'targets.{name}.decode_batch_sizes' must list batch sizes from 1 to 1024")
        if any(not 1 <= tokens <= 1_000_000 for tokens in target.prefill_tokens):
            raise ConfigError(f"{file}: 'targets.{name}.prefill_tokens' must list prompt lengths of at least 1")


def _validate_policy(config: Config, file: Path) -> None:
    unmeasured = sorted(name for name, t in config.targets.items() if not t.concurrency)
    if config.policy.objective == LOAD_OBJECTIVE and unmeasured:
        # A target without load figures would never have anything promoted.
        raise ConfigError(f"{file}: 'policy.objective' = {LOAD_OBJECTIVE!r} needs load figures: set "
                          f"'concurrency' on target(s) {', '.join(unmeasured)} (e.g. concurrency = [1, 4, 16])")
    if config.policy.p95_limit_ms < 0:
        raise ConfigError(f"{file}: 'policy.p95_limit_ms' must be 0 (no limit) or more")
    # The per-token decode objective reads the decode batches; the others the batch sizes.
    decode = config.policy.objective == "decode_ms_per_token"
    measured = "decode_batch_sizes" if decode else "batch_sizes"
    if config.policy.objective_batch_size not in {
        b for t in config.targets.values() for b in getattr(t, measured)
    }:
        raise ConfigError(
            f"{file}: 'policy.objective_batch_size' = {config.policy.objective_batch_size} "
            f"is not measured by any target: add it to the targets' {measured}"
        )
    if config.policy.objective not in OBJECTIVES:
        raise ConfigError(f"{file}: 'policy.objective' must be one of {', '.join(OBJECTIVES)}, "
                          f"got {config.policy.objective!r}")
    if not 0 <= config.policy.max_quality_drop < 1:
        raise ConfigError(f"{file}: 'policy.max_quality_drop' must be in [0, 1)")
    if not 0 <= config.policy.max_sample_drop <= 1:
        raise ConfigError(f"{file}: 'policy.max_sample_drop' must be in [0, 1] (1: no per-sample floor)")
    if not 0 <= config.policy.min_batch_agreement <= 1:
        raise ConfigError(f"{file}: 'policy.min_batch_agreement' must be in [0, 1] (0: not checked)")
    if not 0 <= config.policy.confidence < 1:
        raise ConfigError(f"{file}: 'policy.confidence' must be in [0, 1) (0: the mean drop alone decides)")
    if config.policy.min_heldout_rows < 0:
        raise ConfigError(f"{file}: 'policy.min_heldout_rows' must be 0 (no rule) or more")
    if config.policy.budget_minutes < 0:
        raise ConfigError(f"{file}: 'policy.budget_minutes' must be 0 (no budget) or more")
    if config.policy.runoff_margin < 0:
        raise ConfigError(f"{file}: 'policy.runoff_margin' must be 0 (no run-off) or more")


def _ranges(config: Config):
    """(key, value, lowest, whether the lowest itself is allowed) of every plain number."""
    w, m, r = config.workers, config.measure, config.registry
    return (
        ("workers.count", w.count, 1, True),
        ("workers.job_timeout_seconds", w.job_timeout_seconds, 0, False),
        ("workers.lease_seconds", w.lease_seconds, 0, False),
        ("workers.max_attempts", w.max_attempts, 1, True),
        ("workers.memory_limit_mb", w.memory_limit_mb, 0, True),
        ("measure.warmup_runs", m.warmup_runs, 0, True),
        ("measure.min_runs", m.min_runs, 1, True),
        ("measure.stability", m.stability, 0, False),
        ("measure.min_seconds", m.min_seconds, 0, True),
        ("measure.max_seconds", m.max_seconds, 0, False),
        ("measure.sample_count", m.sample_count, 1, True),
        ("measure.give_up_margin", m.give_up_margin, 0, True),
        ("registry.quiet_seconds", r.quiet_seconds, 0, True),
        ("registry.rescan_seconds", r.rescan_seconds, 0, False),
        ("registry.max_checkpoint_gb", r.max_checkpoint_gb, 0, True),
        ("registry.mlflow.poll_seconds", r.mlflow.poll_seconds, 0, False),
        ("store.busy_timeout_ms", config.store.busy_timeout_ms, 0, True),
    )


def find_config_path(path: str | os.PathLike | None) -> Path:
    """The file named on the command line, else ``$KILN_CONFIG``, else ``./kiln.toml``."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or "kiln.toml"
    return Path(path).expanduser().absolute()


def load_config(path: str | os.PathLike | None = None) -> Config:
    file = find_config_path(path)
    if not file.is_file():
        raise ConfigError(
            f"{file}: no such configuration file. Create one with `kiln init DIR`, "
            f"or pass --config PATH, or set {CONFIG_ENV}."
        )
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    config = _build(Config, data, "", file)
    config.source = file
    _validate(config, file)
    _normalize(config)
    return config


DEFAULT_CONFIG_TEMPLATE = '''\
# modelkiln configuration. Relative paths are relative to this file's folder.
# Every key is optional; the values below are the defaults unless marked otherwise.

[registry]
kind = "directory"
# A checkpoint is a folder <path>/<model>/<version>/ holding the model files, plus
# optionally data to judge and calibrate it on: eval.npz (inputs and labels),
# calibration.npz, train.npz, or as text eval/calibration/train.jsonl (see the README).
path = "models"
# A version is taken as soon as it is renamed into place, or once nothing in it
# has changed for this many seconds.
quiet_seconds = 2.0
# The reconcile scan that finds whatever file-system events missed.
rescan_seconds = 60.0
# A version folder larger than this (sparse files counted in full) is refused before it
# is copied, as is one larger than the free space where artifacts go. 0: no fixed cap.
max_checkpoint_gb = 100.0

# With kind = "mlflow", checkpoints come from an MLflow Model Registry instead: new
# model versions are found by polling, downloaded into `path` (a local cache), and
# processed like folders (same hashing, same trust rules).
[registry.mlflow]
tracking_uri = ""
# Empty: the tracking server's registry.
registry_uri = ""
# Registered models to follow, and/or a search filter ("name LIKE 'prod-%'").
# Both empty: every registered model.
models = []
filter = ""
poll_seconds = 60.0
# What a promotion writes back: a version of the derived registered model holding the
# variant, this alias on it (models:/<derived>@<alias> loads what is served), and a run
# with every variant's metrics.
alias = "kiln-{target}"
derived_model = "{model}-kiln-{target}"
experiment = "modelkiln"

[store]
# A SQLite file (WAL mode) or any SQLAlchemy URL.
url = "kiln.db"
busy_timeout_ms = 30000

[paths]
artifacts = "artifacts"
# promoted/<model>/<target> is a symlink to the served variant, swapped atomically.
promoted = "promoted"

[workers]
# Worker processes that build and measure variants.
count = 1
job_timeout_seconds = 1800.0
# A job whose lease is not renewed for this long (daemon killed) returns to pending.
lease_seconds = 60.0
max_attempts = 3
# Address-space limit of each worker process in MiB. A job that needs more fails with
# "out of memory" instead of pushing the host into swap or the OOM killer. 0: three
# quarters of the host's memory (or of its cgroup's limit), shared among the workers.
# Steps that train pick batch sizes that fit it. Applies to cpu targets: CUDA maps far
# more address space than it uses.
memory_limit_mb = 0

[measure]
warmup_runs = 5
min_runs = 20
# Per batch size, timed runs last at least min_seconds and go on until the median moves
# by less than `stability` (a fraction) between windows of min_runs, or max_seconds.
stability = 0.02
min_seconds = 0.5
max_seconds = 3.0
# Quality samples when the checkpoint ships no eval data: distinct calibration rows (the
# others are what steps train on), or generated inputs when it ships no data.
sample_count = 64
# A variant whose first runs are, by a sequential test, over this many times both the
# served variant's and its baseline's p50 ends its measurement there, recorded with its
# figures and the reason (a form the host runs slowly, say). 0: time every variant in full.
give_up_margin = 3.0

# One table per hardware target. The serving side of this one accepts both
# onnxruntime (CPUExecutionProvider) and PyTorch artifacts, so both compete on it;
# list a single runtime to restrict it.
[targets.cpu]
device = "cpu"
runtimes = ["onnxruntime", "torch"]
threads = 2
# Devices one variant may span: with devices > 1 the shard step builds tensor-parallel
# variants, one process per rank (on cpu they share the threads above).
devices = 1
# Memory one variant's weights may hold at once, in MiB (0: no budget). A variant whose
# weights do not fit is not promoted here; a model bigger than this gets a variant from
# shard.size_capped: size-capped safetensors shards with an index, streamed module by
# module while it runs.
memory_mb = 0
batch_sizes = [1, 8]
# Concurrent clients to measure each variant under as well, e.g. [1, 4, 16]: each sends
# one request, waits for the answer, sends the next; throughput and p50/p95 per level.
# Empty: not measured. policy.objective = "throughput_at_p95_ms" promotes by it.
concurrency = []
# Causal language models are also measured as a server runs them: per-token decode with
# this many sequences at once (each its own KV cache), and prefill of prompts this long
# (at most the model's context). One small decoding program per entry, holding no weights.
decode_batch_sizes = [1, 8, 32]
prefill_tokens = [512, 2048]
# Recipes are chains of steps: "prune.structured(amount=0.5) -> quantize.int8_dynamic".
# "baseline" is the empty recipe: the checkpoint as it is, exported for the runtime.
# A step that does not apply (no stack of blocks to distill, one device to shard over,
# a runtime it does not serve) is recorded as skipped with the reason.
recipes = [
    "baseline",
    "quantize.int8_dynamic",
    "quantize.int8_static",
    "quantize.bf16",
    "compile.onnxruntime",
    "prune.structured -> quantize.int8_dynamic",
    "distill.depth -> quantize.int8_dynamic",
    "shard.tensor_parallel",
    "shard.size_capped",
]

[policy]
# Promote the variant with the lowest p50 latency at this batch size among those whose
# quality is at most max_quality_drop (relative) below the baseline's. Objectives:
# latency_p50_ms, latency_p95_ms; for causal language models also decode_ms_per_token
# (per-token latency of objective_batch_size sequences decoding at once, from the targets'
# decode_batch_sizes: at batch 32 the most tokens per second, with p95_limit_ms bounding
# its p95 where set) and prefill_ms (32-token prompt); throughput_at_p95_ms (see p95_limit_ms).
max_quality_drop = 0.01
# The mean can hide a sample a variant gets wrong: the worst sample's quality (cosine
# metrics) may drop at most max_sample_drop, and for models with an attention mask a
# sample's output alone and in a padded batch must agree to min_batch_agreement (cosine),
# or the variant's answers depend on what it is batched with.
max_sample_drop = 0.05
min_batch_agreement = 0.999
# A mean over a few dozen samples can hide a larger drop: the drop's upper bound at this
# confidence (a bootstrap of the per-sample differences) must be within max_quality_drop
# too. 0: the mean alone decides.
confidence = 0.95
# A variant whose steps trained on the checkpoint's data (distillation, pruning recovery)
# is promoted only when at least this many distinct rows it never trained on judge it:
# eval.* where shipped, else calibration rows set apart by content. Short of that it is
# measured, not promoted, and the reason says what to ship. 0: no such rule.
min_heldout_rows = 64
objective = "latency_p50_ms"
objective_batch_size = 1
# Variants measured one after another meet the host at different moments (a shared or
# virtual machine drifts by tens of percent over minutes): those within this share of the
# best latency are timed again side by side, interleaved in one process, and that
# run-off decides. 0 turns it off.
runoff_margin = 0.25
# Promotion is anytime: a variant that passes the gate is promoted as soon as it is
# measured if it beats what is served (by more than runoff_margin against a variant of
# the same checkpoint); the last variant's end makes the final decision. Jobs run cheapest
# first (exports and post-training quantization before anything that trains), and a
# checkpoint's variant jobs must start within budget_minutes of its inspection: later ones
# are skipped with the reason. 0: no budget.
budget_minutes = 60.0
# With objective = "throughput_at_p95_ms" (targets need concurrency): the most requests
# per second at a load level whose p95 latency stays within this many ms (0: any).
p95_limit_ms = 0.0

# Weights without an architecture (model.safetensors or a state dict .pt/.pth) need a
# factory that builds the module, matched on the model's folder name. For example:
# [architectures.digits]
# factory = "modelkiln.demo:digits_mlp"   # module:callable returning a torch.nn.Module
# input_shape = [64]                      # one sample, without the batch dimension
# input_dtype = "float32"
#
# A model whose data ships as images (calibration/, eval/ or train/ folders of PNG or
# JPEG files) says once how they become its input; they are read with Pillow:
# [architectures.detector.images]
# input = "images"                        # empty: the model's only input
# size = [416, 416]                       # [height, width] each image is resized to (bilinear)
# scale = 255.0                           # pixel values are divided by this,
# mean = [0.485, 0.456, 0.406]            # then less this per channel,
# std = [0.229, 0.224, 0.225]             # then over this per channel
# channels = "RGB"                        # RGB, BGR or L
# layout = "NCHW"                         # or NHWC

[plugins]
# Empty: every installed plugin. Names as `kiln plugins` shows them.
enabled = []
disabled = []

[logging]
level = "INFO"
# "text", or "json" for one object per line; lines about a model, version, target or
# job name them (text: [model=... version=... target=... job=...]).
format = "text"

[http]
# /healthz (200 only while the database, scheduler and watcher are alive) and
# /metrics (Prometheus text format). Loopback by default; "" turns it off.
address = "127.0.0.1:9464"
'''


def write_default_config(directory: Path, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "kiln.toml"
    if file.exists():
        raise ConfigError(f"{file}: already exists; remove it first or choose another folder")
    file.write_text(DEFAULT_CONFIG_TEMPLATE + extra, encoding="utf-8")
    (directory / "models").mkdir(exist_ok=True)
    return file
