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
from ..plugins.api import MASK, ONNX, TORCH, InputSpec, LoadContext, ModelHandle, StepContext
from ..plugins.recipes import parse_recipe
from ..registry.formats import detect_format, no_format_reason
from ..targets import harness
from ..targets.quality import (
    COSINE,
    NEXT_TOKEN_TOP1,
    PERPLEXITY_RATIO,
    POOLED_COSINE,
    Gate,
    GateLimits,
    choose_metric,
    degenerate_reason,
    delta_standard_error,
    drop_bounds,
    gate_reason,
    next_token_kl,
    perplexity,
    perplexity_ratio,
    row_cosines,
    score,
)
from ..targets.load import load_curve
from ..targets.onnx_import import imported
from ..targets.onnxrt import session_runner
from ..targets.shapes import onnx_axes
from . import progress
from .context import INSPECT_FILE, REFERENCE_FILE, plugins_for_spec, reference
from .probes import probe_figures, probe_reference
from .samples import request_batch, settle, text_length_limit
from .samples import lengths as sample_lengths

_INFER_CHUNK = 64
# Calls before the first load level is timed, at least.
LOAD_WARMUP_RUNS = 50


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
    context = LoadContext(spec["model"], ArchitectureConfig.from_dict(arch) if arch else None)
    return fmt.load(directory, context)


def _run_source(loaded, arrays: dict) -> np.ndarray:
    """Outputs of the original checkpoint, in chunks: the reference every variant meets."""
    if loaded.module is not None:
        import torch

        def run(batch):
            with torch.inference_mode():
                return loaded.module(*(torch.from_numpy(v) for v in batch.values())).float().numpy()
    else:
        session = session_runner(loaded.onnx_path, 0)

        def run(batch):
            return np.asarray(session(batch))

    return harness.run_chunked(run, arrays, _INFER_CHUNK)


def inspect_checkpoint(spec: dict) -> dict:
    """Load the checkpoint safely, settle its inputs, and record the reference outputs."""
    started = time.perf_counter()
    plugins = plugins_for_spec(spec)
    directory = Path(spec["checkpoint_dir"])
    loaded = _load(spec, plugins, spec.get("format"))
    arch = spec.get("architecture")
    settled = settle(loaded, directory, spec["sample_count"], (arch or {}).get("images"))
    inputs, rows = settled.inputs, settled.samples
    try:
        reference = _run_source(loaded, rows)
    except Exception as exc:
        raise CheckpointRejected(f"{directory}: the model fails on its sample inputs ({exc})") from None
    if not np.isfinite(reference).all():
        bad = int((~np.isfinite(reference.reshape(len(reference), -1)).all(axis=1)).sum())
        raise CheckpointRejected(f"{directory}: the model's outputs are NaN or infinite on {bad} of its "
                                 f"{len(reference)} sample inputs ({settled.source}); nothing can be compared to "
                                 "them: check the weights and the sample data")
    from ..targets.decoding import find_causal_lm

    causal_lm = loaded.module is not None and find_causal_lm(loaded.module) is not None
    mask = rows.get(MASK)
    metric = choose_metric(reference, settled.labels, causal_lm, masked=mask is not None,
                           real_data=settled.source != "generated")
    baseline_quality = score(metric, reference, reference, settled.labels, mask, rows.get("input_ids"))
    # The original's perplexity on its samples: once here, not again in every variant's job.
    baseline_perplexity = perplexity(reference, rows["input_ids"]) if causal_lm and reference.ndim == 3 else None
    arrays = {f"input:{k}": v for k, v in rows.items()}
    arrays["reference"] = reference
    # modelkiln's own probe set: a second opinion on text models, apart from their data.
    probe_arrays, probes = probe_reference(loaded, inputs, _run_source, causal_lm, text_length_limit(inputs))
    arrays.update(probe_arrays)
    if settled.labels is not None:
        arrays["labels"] = settled.labels
    for kind, data in (("calibration", settled.calibration), ("train", settled.train)):
        arrays.update({f"{kind}:{k}": v for k, v in (data or {}).items()})
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / REFERENCE_FILE, **arrays)
    output_axes = onnx_axes(inputs, reference.shape)[1]
    result = {
        "status": "ready",
        "format": loaded.format,
        "inputs": [i.as_dict() for i in inputs],
        "outputs": [{"name": loaded.output, "dtype": "float32",
                     "shape": [output_axes.get(axis, size) for axis, size in enumerate(reference.shape)]}],
        "lengths": sample_lengths(inputs, rows),
        "sample_source": settled.source,
        "training_source": settled.train_source,
        # How many distinct rows judge the variants and how many steps may train on.
        "data_split": settled.split.as_dict(),
        "probes": probes,
        "serving_files": loaded.serving_files,
        "quality_metric": metric,
        "baseline_quality": baseline_quality,
        "baseline_perplexity": baseline_perplexity,
        "samples": int(len(reference)),
        "info": loaded.info,
        "seconds": time.perf_counter() - started,
    }
    (work / INSPECT_FILE).write_text(json.dumps(result))
    return result


def _in_form(model, forms, runtime, step, context):
    """``model`` in one of ``forms`` (one form, or a tuple of the forms the step takes as
    they are), converting through the runtime where that is the way there."""
    forms = (forms,) if isinstance(forms, str) else tuple(forms)
    if model.form in forms:
        return model
    form = forms[0]
    if model.form == ONNX and form == TORCH:
        try:
            return imported(model, context)
        except StepNotApplicable as exc:
            raise StepNotApplicable(f"{step.name} needs a {form} model, but this one is {model.form} by now, and "
                                    f"{exc}") from None
    if form == runtime.form:
        converted = runtime.convert(model, context)
        if converted.form == form:
            return converted
    raise StepNotApplicable(f"{step.name} needs a {form} model, but this one is {model.form} by now")


def _rows_of(arrays: dict, kind: str) -> dict | None:
    """The ``calibration`` or ``train`` rows inspect saved, by input name."""
    prefix = f"{kind}:"
    rows = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return rows or None


def _serving_files(spec: dict, inspected: dict, model, out: Path) -> list[str]:
    """Copy what serving code reads beside the model (tokenizer, config) into the variant
    folder. A module that carries its own config (a pruned model's head counts) writes
    that one instead of the checkpoint's."""
    import shutil

    source = Path(spec["checkpoint_dir"])
    copied = []
    for name in inspected.get("serving_files", []):
        if not (out / name).exists():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    config = getattr(getattr(model.obj, "inner", None), "config", None)
    if model.form == TORCH and "config.json" in copied and config is not None and hasattr(config, "to_json_file"):
        config.to_json_file(str(out / "config.json"))
    return copied


def build_variant(spec: dict) -> dict:
    """Load the checkpoint, apply the recipe's steps, convert for the runtime, save."""
    t0 = time.perf_counter()
    plugins = plugins_for_spec(spec)
    inspected, arrays, samples = reference(spec)
    runtime = plugins.runtimes.get(spec["runtime"])
    if runtime is None:
        raise StepNotApplicable(f"runtime {spec['runtime']} is not installed on this host")
    recipe = parse_recipe(spec["recipe"], plugins.steps)
    model = _model_handle(_load(spec, plugins, inspected["format"]), inspected)
    tracker = progress.current()
    context = _step_context(spec, runtime, inspected, arrays, samples, tracker)
    timings = {"load_seconds": time.perf_counter() - t0, "convert_seconds": 0.0, "step_seconds": 0.0}
    lineage: list[dict] = []
    for step_ref in recipe.steps:
        if tracker is not None:
            tracker.step(step_ref.name)
        model, entry = _apply_step(plugins.steps[step_ref.name], step_ref, model, runtime, context, inspected,
                                   timings, first=not lineage)
        lineage.append(entry)
    if tracker is not None:
        tracker.step(f"saving for {runtime.name}")
    c0 = time.perf_counter()
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    companions = _serving_files(spec, inspected, model, out)
    model = runtime.convert(model, context)
    file = runtime.save(model, out)
    timings["convert_seconds"] += time.perf_counter() - c0
    described = getattr(runtime, "weights", None)  # a plugin's runtime need not subclass Runtime
    return {"status": "built", "file": file, "serving_files": companions, "lineage": lineage, "timings": timings,
            "weights": described(out) if callable(described) else None}


def _model_handle(loaded, inspected: dict) -> ModelHandle:
    """The loaded checkpoint as the first step takes it, with the inputs inspect settled."""
    inputs = [InputSpec.from_dict(i) for i in inspected["inputs"]]
    if loaded.module is not None:
        # Which factory built the module: what a step that rebuilds it elsewhere names.
        notes = {"factory": loaded.info["factory"]} if loaded.info.get("factory") else {}
        return ModelHandle(TORCH, loaded.module, inputs, notes)
    return ModelHandle(ONNX, Path(loaded.onnx_path), inputs)


def _step_context(spec: dict, runtime, inspected: dict, arrays: dict, samples: dict, tracker) -> StepContext:
    """What every step of the job may use: the target, the samples and the rows split by
    content, the gate, the budgets."""
    target = spec["target"]
    return StepContext(
        Path(spec["work_dir"]), target["name"], runtime.name, target["device"], target["threads"], samples,
        _rows_of(arrays, "calibration"), _rows_of(arrays, "train"),
        gate=Gate(inspected["quality_metric"], arrays["reference"], arrays.get("labels"),
                  inspected["baseline_quality"], gate_limits(spec).max_quality_drop, samples.get(MASK),
                  samples.get("input_ids")),
        devices=target.get("devices", 1), memory_mb=target.get("memory_mb", 0),
        worker_memory_mb=spec.get("worker_memory_mb", 0), reporter=tracker,
        training_source=inspected.get("training_source") or "train.npz",
        split=inspected.get("data_split"),
        decode_batch_sizes=tuple(target.get("decode_batch_sizes", (1,))),
        prefill_tokens=tuple(target.get("prefill_tokens", ())),
        blob_dir=Path(spec["blob_dir"]) if spec.get("blob_dir") else None,
    )


def _apply_step(step, step_ref, model: ModelHandle, runtime, context: StepContext, inspected: dict,
                timings: dict, first: bool) -> tuple[ModelHandle, dict]:
    """``model`` through one step of the recipe (converted into the form it takes first),
    and the step's lineage entry; adds to ``timings``."""
    form = step.forms.get(runtime.name)
    if form is None:
        raise StepNotApplicable(f"{step.name} does not serve the {runtime.name} runtime")
    c0 = time.perf_counter()
    model = _in_form(model, form, runtime, step, context)
    s0 = time.perf_counter()
    context.record = {}
    if first and "onnx_import" in model.notes:  # the first step's record says it worked on an import
        context.record["onnx_import"] = model.notes["onnx_import"]
    params = {**{p.name: p.default for p in step.params}, **dict(step_ref.params)}
    model = step.apply(model, params, context)
    s1 = time.perf_counter()
    timings["convert_seconds"] += s0 - c0
    timings["step_seconds"] += s1 - s0
    entry = {"step": step.name, "params": params, "plugin": getattr(step, "plugin", ""),
             "record": context.record, "seconds": s1 - s0}
    trains = getattr(step, "trains", None)  # a plugin's step need not subclass Step
    # A step that may train records ``fitted: False`` where it ended up fitting nothing
    # (no rows to fit on): then nothing of the data is in its variant.
    if callable(trains) and trains(params) and context.record.get("fitted", True):
        # What it trained on and how many rows it never saw judge it: the policy's
        # held-out rule reads this (policy.min_heldout_rows).
        entry["data"] = inspected.get("data_split")
    return model, entry


def gate_limits(spec: dict) -> GateLimits:
    """What the job's policy lets the gate allow (defaults where the spec names none)."""
    return GateLimits(**spec.get("gate", {}))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# Samples run one at a time, unpadded, against their rows of the padded batch.
ALONE_ROWS = 16


def _padded_vs_alone(run, samples: dict, outputs: np.ndarray) -> float:
    """The least cosine between a sample's pooled embedding in the padded batch and run
    alone at its own length: 1.0 where padding and batch company change nothing (float
    variants); dynamic int8 scales its activations per batch, so it shows there."""
    mask = samples[MASK]
    worst = 1.0
    for row in range(min(ALONE_ROWS, len(mask))):
        length = int(mask[row].sum())
        alone = {k: np.ascontiguousarray(v[row:row + 1, :length]) for k, v in samples.items()}
        single = np.asarray(run(alone), dtype=np.float32)
        padded = outputs[row:row + 1, :length]
        worst = min(worst, float(row_cosines(POOLED_COSINE, single, padded, alone[MASK])[0]))
    return worst


def _quality(metric: str, outputs: np.ndarray, expected: np.ndarray, inspected: dict, arrays: dict,
             samples: dict) -> tuple[float, dict]:
    """The variant's quality by ``metric``; for a language model also the variant's and the
    original's perplexity on the sample text, each computed once (the checks record them)."""
    if metric not in (NEXT_TOKEN_TOP1, PERPLEXITY_RATIO):
        return score(metric, outputs, expected, arrays.get("labels"), samples.get(MASK)), {}
    perplexities = {
        "perplexity": perplexity(outputs, samples["input_ids"]),
        "baseline_perplexity": inspected.get("baseline_perplexity") or perplexity(expected, samples["input_ids"]),
    }
    if metric == PERPLEXITY_RATIO:
        return perplexity_ratio(perplexities["baseline_perplexity"], perplexities["perplexity"]), perplexities
    return score(metric, outputs, expected, arrays.get("labels"), samples.get(MASK)), perplexities


def _time_batches(timer, spec: dict, inspected: dict, samples: dict, rss_before: int, length: int | None,
                  rivals: dict | None) -> tuple[list[dict], str | None]:
    """Latency per batch size of the target, at ``length`` tokens where the model takes
    sequences; with ``rivals``, the timing at their batch size may end early, and then
    the larger sizes are not timed. The rows, and why the timing ended early (or None)."""
    target, settings = spec["target"], spec["measure"]
    tracker = progress.current()
    rows: list[dict] = []
    ended_early = None
    for index, batch_size in enumerate(target["batch_sizes"]):
        if tracker is not None:
            tracker(f"timing batch {batch_size}" + (f" at {length} tokens" if length else ""), index,
                    len(target["batch_sizes"]))
        early = ({"give_up": harness.slower_than(rivals["p50_ms"], rivals["margin"])}
                 if rivals and batch_size == rivals["batch_size"] and not rows else {})
        timing = timer(
            request_batch(inspected["inputs"], samples, batch_size, length),
            warmup_runs=settings["warmup_runs"], min_runs=settings["min_runs"],
            stability=settings["stability"], max_seconds=settings["max_seconds"],
            min_seconds=settings["min_seconds"], **early,
        )
        timing["batch_size"] = batch_size
        timing["throughput_per_s"] = batch_size * 1000.0 / timing["latency_p50_ms"]
        timing.setdefault("peak_memory_bytes", max(0, harness.peak_rss_bytes() - rss_before))
        ended_early = timing.pop("ended_early", None)
        rows.append(timing)
        if ended_early:
            break
    return rows, ended_early


def _under_load(run, spec: dict, inspected: dict, samples: dict, length: int | None) -> list[dict]:
    """Throughput and latency at each of the target's levels of concurrent batch-1
    clients, at ``length`` tokens."""
    target, settings = spec["target"], spec["measure"]
    tracker = progress.current()
    if tracker is not None:
        tracker("timing under load", 0, len(target["concurrency"]))
    return load_curve(run, request_batch(inspected["inputs"], samples, 1, length),
                      list(target["concurrency"]), max(settings["max_seconds"], 0.5),
                      # the first level must not pay for a runtime's first calls
                      # (allocators, TorchScript's optimising executor)
                      max(settings["warmup_runs"], LOAD_WARMUP_RUNS))


def _quality_checks(run, metric: str, outputs: np.ndarray, expected: np.ndarray, inspected: dict, arrays: dict,
                    samples: dict, perplexities: dict, degenerate: str | None) -> dict:
    """What the gate judges beside the quality: the worst sample, the spread and bound of
    the drop, the probe rows, and what the runtime checked while loading."""
    # What the runtime checked while loading (e.g. a sharded variant's equality check).
    checks = dict(getattr(run, "details", {}))
    if perplexities:
        checks["next_token_kl"] = next_token_kl(outputs, expected)
        checks["next_token_top1"] = score(NEXT_TOKEN_TOP1, outputs, expected, None)
        # On the sample text itself: how well each variant predicts it, beside the original.
        checks.update(perplexities)
    elif metric in (COSINE, POOLED_COSINE):  # the gate judges the worst sample too
        checks["min_cosine"] = float(row_cosines(metric, outputs, expected, samples.get(MASK)).min())
    spread = delta_standard_error(metric, outputs, expected, arrays.get("labels"))
    if spread is not None:  # how finely these samples tell a drop from chance
        checks["quality_delta_se"] = spread
    checks["samples"] = int(len(expected))
    if degenerate is None:  # how large the drop may be, not only its mean
        checks["quality_drop_bounds"] = drop_bounds(metric, outputs, expected, arrays.get("labels"),
                                                    samples.get(MASK), samples.get("input_ids"))
    checks.update(probe_figures(run, arrays, (inspected.get("probes") or {}).get("metric"), _INFER_CHUNK))
    if metric == POOLED_COSINE:
        checks["padded_vs_alone_min_cosine"] = _padded_vs_alone(run, samples, outputs)
    if degenerate is not None:
        checks["degenerate"] = degenerate
    return checks


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
    outputs = harness.run_chunked(run, samples, _INFER_CHUNK).astype(np.float32)
    metric = inspected["quality_metric"]
    expected = arrays["reference"].astype(np.float32)
    quality, perplexities = _quality(metric, outputs, expected, inspected, arrays, samples)
    degenerate = degenerate_reason(outputs, expected)
    if degenerate is not None:  # no metric may call such outputs faithful
        quality = 0.0
    timer = harness.timer_for(run)
    # Where the planner gave the served variant's and the baseline's p50 (``rivals``), a
    # variant clearly slower than both after its first runs ends its measurement there;
    # not a causal LM's, which its decoding may still make the one to serve.
    rivals = spec.get("rivals") if not hasattr(run, "time_runs") and not hasattr(run, "time_decoding") else None
    # A model that takes sequences is timed at the samples' median length (what a typical
    # request costs: the figures the policy compares) and at their longest.
    lengths = inspected.get("lengths")
    median = lengths["median"] if lengths else None
    measurements, ended_early = _time_batches(timer, spec, inspected, samples, rss_before, median, rivals)
    sequence = None
    if lengths and not ended_early:  # one that ended early: the rest cannot change that it loses
        at_max = (measurements if lengths["max"] == lengths["median"]
                  else _time_batches(timer, spec, inspected, samples, rss_before, lengths["max"], None)[0])
        sequence = {"median_length": lengths["median"], "max_length": lengths["max"],
                    "batches_at_max_length": at_max}
    decode = run.time_decoding() if hasattr(run, "time_decoding") and not ended_early else None
    # Under load: concurrent batch-1 clients, at the median length; not for runtimes whose
    # loaded artifact answers one caller at a time (ranks behind pipes, streamed weights).
    load = None
    if target.get("concurrency") and getattr(run, "concurrent", True) and decode is None and not ended_early:
        load = _under_load(run, spec, inspected, samples, median)
    checks = _quality_checks(run, metric, outputs, expected, inspected, arrays, samples, perplexities, degenerate)
    gate = gate_reason(quality, inspected["baseline_quality"], metric, checks, gate_limits(spec),
                       lineage=spec["previous"].get("lineage"))
    if degenerate is not None:
        gate = f"{gate} ({degenerate})"
    return {
        "status": "measured",
        # Why the variant misses the quality gate, or None when it passes.
        "gate": gate,
        # Why its timing stopped after the first runs (clearly slower than its rivals), or None.
        "ended_early": ended_early,
        "checks": checks,
        "sequence": sequence,
        # A causal language model's prefill and per-token decode latency, where measured.
        "decode": decode,
        # Throughput and latency under concurrent clients, where the target asks for them.
        "load": load,
        "quality_metric": metric,
        "quality": quality,
        "baseline_quality": inspected["baseline_quality"],
        "size_bytes": _dir_size(out),
        "measurements": measurements,
        "environment": harness.environment(target["device"], target["threads"]),
        "timings": {"measure_seconds": time.perf_counter() - t0},
    }
