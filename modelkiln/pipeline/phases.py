"""What runs inside a worker process: inspect a checkpoint, build a variant, measure it.

Each phase takes a JSON-able spec and returns a JSON-able result; it runs in its own
fresh process (forked from a pre-warmed server), so a crash, a hang or a leak in model
loading or plugin code costs one job, never the daemon. Build and measure are separate
processes so that what a build allocated never inflates a measurement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import ArchitectureConfig
from ..errors import CheckpointRejected, StepNotApplicable
from ..plugins.api import ONNX, TORCH, InputSpec, LoadContext, ModelHandle, StepContext
from ..plugins.recipes import parse_recipe
from ..registry.data import load_calibration, load_eval, load_train
from ..registry.formats import detect_format, no_format_reason
from ..targets import harness
from ..targets.quality import NEXT_TOKEN_TOP1, Gate, choose_metric, next_token_kl, score
from .context import INSPECT_FILE, REFERENCE_FILE, plugins_for_spec, reference

# Eval rows used for a quality score: enough for a stable accuracy, bounded for big sets.
MAX_EVAL_ROWS = 4096
_INFER_CHUNK = 64


def _load(spec, plugins, fmt_name: str | None = None):
    directory = Path(spec["checkpoint_dir"])
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    fmt = (
        next((f for f in plugins.formats if f.name == fmt_name), None)
        if fmt_name
        else detect_format(plugins.formats, files)
    )
    if fmt is None:
        raise CheckpointRejected(no_format_reason(directory, files))
    arch = spec.get("architecture")
    context = LoadContext(spec["model"], ArchitectureConfig(**arch) if arch else None)
    return fmt.load(directory, context)


def _run_source(loaded, arrays: dict) -> np.ndarray:
    """Outputs of the original checkpoint, in chunks: the reference every variant meets."""
    if loaded.module is not None:
        import torch

        def run(batch):
            with torch.inference_mode():
                return loaded.module(*(torch.from_numpy(v) for v in batch.values())).float().numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])

        def run(batch):
            return np.asarray(session.run(None, batch)[0])

    return harness.run_chunked(run, arrays, _INFER_CHUNK)


def _generate(inputs: list[InputSpec], count: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = (count, *spec.shape[1:])
        if np.dtype(spec.dtype).kind in "iu":
            out[spec.name] = rng.integers(0, spec.high or 2, size=shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def _resolve_inputs(loaded, eval_data, calibration, directory: Path) -> list[InputSpec]:
    """The model's inputs as the rest of the pipeline uses them.

    Shipped data decides the per-row shape (e.g. the sequence length of token ids) when
    its rank fits the model's input; whether the model really takes it is settled by the
    reference run that follows, which rejects the checkpoint with the error if not.
    """
    data = eval_data if eval_data is not None else calibration
    if data is None:
        if not loaded.inputs:
            raise CheckpointRejected(
                f"{directory}: the model's input shape is unknown; set input_shape in its "
                "[architectures.<model>] table or ship eval.npz / calibration.npz"
            )
        return loaded.inputs
    array = data["inputs"]
    if not loaded.inputs:
        return [InputSpec("input", (-1, *array.shape[1:]), array.dtype.name)]
    if len(loaded.inputs) != 1:
        raise CheckpointRejected(
            f"{directory}: eval/calibration data holds one input array but the model takes "
            f"{len(loaded.inputs)} inputs"
        )
    (spec,) = loaded.inputs
    if array.ndim != len(spec.shape):
        raise CheckpointRejected(
            f"{directory}: data inputs have shape {array.shape[1:]} per row but the model "
            f"takes {tuple(spec.shape[1:])}"
        )
    return [InputSpec(spec.name, (-1, *array.shape[1:]), spec.dtype, spec.high)]


def inspect_checkpoint(spec: dict) -> dict:
    """Load the checkpoint safely, settle its inputs, and record the reference outputs."""
    started = time.perf_counter()
    plugins = plugins_for_spec(spec)
    directory = Path(spec["checkpoint_dir"])
    loaded = _load(spec, plugins, spec.get("format"))
    eval_data = load_eval(directory)
    calibration = load_calibration(directory)
    inputs = _resolve_inputs(loaded, eval_data, calibration, directory)
    count = spec["sample_count"]
    if eval_data is not None:
        source = eval_data["inputs"][:MAX_EVAL_ROWS]
    elif calibration is not None:
        source = calibration["inputs"][:count]
    else:
        source = None
    if source is not None:
        samples = {inputs[0].name: np.ascontiguousarray(source.astype(inputs[0].dtype))}
    else:
        samples = _generate(inputs, count)
    try:
        reference = _run_source(loaded, samples)
    except Exception as exc:
        raise CheckpointRejected(f"{directory}: the model fails on its sample inputs ({exc})") from None
    labels = eval_data["labels"][:MAX_EVAL_ROWS] if eval_data is not None else None
    from ..targets.decoding import find_causal_lm

    causal_lm = loaded.module is not None and find_causal_lm(loaded.module) is not None
    metric = choose_metric(reference, labels, causal_lm)
    baseline_quality = score(metric, reference, reference, labels)
    arrays = {f"input:{k}": v for k, v in samples.items()}
    arrays["reference"] = reference
    if labels is not None:
        arrays["labels"] = labels
    if calibration is not None:
        arrays["calibration"] = calibration["inputs"]
    train = load_train(directory)
    if train is not None:
        arrays["train"] = train["inputs"]
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / REFERENCE_FILE, **arrays)
    result = {
        "status": "ready",
        "format": loaded.format,
        "inputs": [dict(name=i.name, shape=list(i.shape), dtype=i.dtype, high=i.high) for i in inputs],
        "quality_metric": metric,
        "baseline_quality": baseline_quality,
        "samples": int(len(reference)),
        "info": loaded.info,
        "seconds": time.perf_counter() - started,
    }
    (work / INSPECT_FILE).write_text(json.dumps(result))
    return result


def _in_form(model, form: str, runtime, step, context):
    """``model`` in ``form``, converting through the runtime where that is the way there."""
    if model.form == form:
        return model
    if form == runtime.form:
        converted = runtime.convert(model, context)
        if converted.form == form:
            return converted
    raise StepNotApplicable(f"{step.name} needs a {form} model, but this one is {model.form} by now")


def build_variant(spec: dict) -> dict:
    """Load the checkpoint, apply the recipe's steps, convert for the runtime, save."""
    t0 = time.perf_counter()
    plugins = plugins_for_spec(spec)
    inspected, arrays, samples = reference(spec)
    runtime = plugins.runtimes.get(spec["runtime"])
    if runtime is None:
        raise StepNotApplicable(f"runtime {spec['runtime']} is not installed on this host")
    recipe = parse_recipe(spec["recipe"], plugins.steps)
    loaded = _load(spec, plugins, inspected["format"])
    inputs = [InputSpec(i["name"], tuple(i["shape"]), i["dtype"], i["high"]) for i in inspected["inputs"]]
    if loaded.module is not None:
        # Which factory built the module: what a step that rebuilds it elsewhere names.
        notes = {"factory": loaded.info["factory"]} if loaded.info.get("factory") else {}
        model = ModelHandle(TORCH, loaded.module, inputs, notes)
    else:
        model = ModelHandle(ONNX, Path(loaded.onnx_path), inputs)
    calibration = {inputs[0].name: arrays["calibration"]} if "calibration" in arrays else None
    training = {inputs[0].name: arrays["train"]} if "train" in arrays else None
    target = spec["target"]
    context = StepContext(
        Path(spec["work_dir"]), target["name"], runtime.name, target["device"], target["threads"], samples,
        calibration, training,
        gate=Gate(inspected["quality_metric"], arrays["reference"], arrays.get("labels"),
                  inspected["baseline_quality"], spec.get("max_quality_drop", 0.01)),
        devices=target.get("devices", 1), memory_mb=target.get("memory_mb", 0),
    )
    timings = {"load_seconds": time.perf_counter() - t0, "convert_seconds": 0.0, "step_seconds": 0.0}
    lineage = []
    for step_ref in recipe.steps:
        step = plugins.steps[step_ref.name]
        form = step.forms.get(runtime.name)
        if form is None:
            raise StepNotApplicable(f"{step.name} does not serve the {runtime.name} runtime")
        c0 = time.perf_counter()
        model = _in_form(model, form, runtime, step, context)
        s0 = time.perf_counter()
        context.record = {}
        params = {**{p.name: p.default for p in step.params}, **dict(step_ref.params)}
        model = step.apply(model, params, context)
        s1 = time.perf_counter()
        timings["convert_seconds"] += s0 - c0
        timings["step_seconds"] += s1 - s0
        lineage.append({
            "step": step.name, "params": params, "plugin": getattr(step, "plugin", ""),
            "record": context.record, "seconds": s1 - s0,
        })
    c0 = time.perf_counter()
    model = runtime.convert(model, context)
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    file = runtime.save(model, out)
    timings["convert_seconds"] += time.perf_counter() - c0
    return {"status": "built", "file": file, "lineage": lineage, "timings": timings}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_variant(spec: dict) -> dict:
    """Load the artifact as serving code would, score its quality, time it per batch size."""
    t0 = time.perf_counter()
    plugins = plugins_for_spec(spec)
    inspected, arrays, samples = reference(spec)
    runtime = plugins.runtimes[spec["runtime"]]
    target = spec["target"]
    out = Path(spec["out_dir"])
    rss_before = harness.current_rss_bytes()
    run = runtime.load(out, spec["previous"]["file"], target["device"], target["threads"])
    outputs = harness.run_chunked(run, samples, _INFER_CHUNK)
    metric = inspected["quality_metric"]
    quality = score(metric, outputs.astype(np.float32), arrays["reference"].astype(np.float32), arrays.get("labels"))
    settings = spec["measure"]
    measurements = []
    timer = harness.timer_for(run)
    for batch_size in target["batch_sizes"]:
        timing = timer(
            harness.batch_of(samples, batch_size),
            warmup_runs=settings["warmup_runs"], min_runs=settings["min_runs"],
            stability=settings["stability"], max_seconds=settings["max_seconds"],
            min_seconds=settings["min_seconds"],
        )
        timing["batch_size"] = batch_size
        timing["throughput_per_s"] = batch_size * 1000.0 / timing["latency_p50_ms"]
        timing.setdefault("peak_memory_bytes", max(0, harness.peak_rss_bytes() - rss_before))
        measurements.append(timing)
    decode = run.time_decoding() if hasattr(run, "time_decoding") else None
    # What the runtime checked while loading (e.g. a sharded variant's equality check).
    checks = dict(getattr(run, "details", {}))
    if metric == NEXT_TOKEN_TOP1:
        checks["next_token_kl"] = next_token_kl(outputs.astype(np.float32), arrays["reference"].astype(np.float32))
    return {
        "status": "measured",
        "checks": checks,
        # A causal language model's prefill and per-token decode latency, where measured.
        "decode": decode,
        "quality_metric": metric,
        "quality": quality,
        "baseline_quality": inspected["baseline_quality"],
        "size_bytes": _dir_size(out),
        "measurements": measurements,
        "timings": {"measure_seconds": time.perf_counter() - t0},
    }
