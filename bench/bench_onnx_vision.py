"""A real pretrained ONNX conv detector through the untouched default config, against
onnxruntime's own ``quantize_static``.

The detector is the YOLOX model the ``ddddocr`` package ships (``common_det.onnx``:
opset 11, ``1 x 3 x 416 x 416``, 83 Convs joined by SiLU); ``--model ppocr`` takes the
PaddleOCR text detector ``rapidocr-onnxruntime`` ships instead (opset 12, every dimension
dynamic, its weights as Constant nodes). The photos are scikit-image's sample images
(shipped in its wheel): random square crops, 40 written as PNG files into the
checkpoint's ``calibration/`` folder at their own sizes, and 16 other crops held out for
timing and fidelity. The only addition to ``kiln init``'s config is the
``[architectures.detector.images]`` table that says how the images become the input.

The peer is what a user would run from onnxruntime's documentation: ``quant_pre_process``
then ``quantize_static`` (QDQ, per-channel, its defaults otherwise) on the same 40
images. On an opset-11 model its per-channel ``DequantizeLinear`` does not load (axis
needs opset 13), so the peer gets the model raised to opset 13 first.

Every model is timed on the held-out images at batch 1, 2 threads, in interleaved
rounds in one process (the promoted one with its ``serving.json`` session settings);
fidelity is the cosine of each held-out image's output against the float model's, worst
and mean. Run: ``python bench/bench_onnx_vision.py [--model yolox|ppocr]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import kiln_folder, optimize, print_table

MODELS = {
    # package, file inside it, [height, width], images table
    "yolox": ("ddddocr", "common_det.onnx", [416, 416], "scale = 1.0\n"),
    "ppocr": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", [320, 320],
              "scale = 255.0\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"),
}
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "page.png", "text.png",
          "hubble_deep_field.jpg", "retina.jpg", "horse.png", "camera.png", "coins.png", "color.png", "ihc.png",
          "brick.png", "grass.png")
CALIBRATION, HELD_OUT = 40, 16


def package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"pip install --no-deps {package.replace('_', '-')} (it ships the model) and scikit-image")
    return Path(next(iter(spec.submodule_search_locations))) / name


def crops(count: int, seed: int, folder: Path) -> list[Path]:
    """``count`` random square crops of scikit-image's photos, saved as PNG at their own size."""
    from PIL import Image

    photos = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        with Image.open(photos / PHOTOS[i % len(PHOTOS)]) as photo:
            image = photo.convert("RGB")
        side = int(min(image.size) * rng.uniform(0.4, 1.0))
        x, y = rng.integers(0, image.width - side + 1), rng.integers(0, image.height - side + 1)
        path = folder / f"{i:03d}.png"
        image.crop((x, y, x + side, y + side)).save(path)
        paths.append(path)
    return paths


def peer_quantize_static(model: Path, calibration: np.ndarray, input_name: str, work: Path) -> tuple[Path, float]:
    """onnxruntime's documented path: pre-process, then quantize_static (QDQ, per channel)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    source = onnx.load(str(model))
    if next(o.version for o in source.opset_import if o.domain in ("", "ai.onnx")) < 13:
        onnx.save_model(version_converter.convert_version(source, 13), str(work / "opset13.onnx"))
        model = work / "opset13.onnx"
    prepared = work / "prepared.onnx"
    try:
        quant_pre_process(str(model), str(prepared))
    except Exception:  # symbolic shape inference gives up on graphs whose every dimension varies
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)

    class Reader:
        def __init__(self):
            self.rows = iter({input_name: calibration[i:i + 1]} for i in range(len(calibration)))

        def get_next(self):
            return next(self.rows, None)

    out = work / "peer.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out, time.perf_counter() - started


def main():
    import logging

    import onnxruntime as ort

    from modelkiln.config import load_config
    from modelkiln.registry.data import load_images
    from modelkiln.targets.host import cpu_model_and_flags
    from modelkiln.targets.onnxrt import session_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="yolox")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime's quantizer warns per tensor
    ort.set_default_logger_severity(3)
    package, name, size, table = MODELS[args.model]
    model = package_file(package, name)
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-vision-"))
    checkpoint = work / "detector"
    checkpoint.mkdir()
    shutil.copy(model, checkpoint / "model.onnx")
    crops(CALIBRATION, 0, checkpoint / "calibration")
    held_out = crops(HELD_OUT, 1, work / "held-out")
    images = {"size": size, **{k.strip(): json.loads(v) for k, v in (line.split("=") for line in table.splitlines())}}
    input_name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    folder = kiln_folder(f"\n[architectures.detector.images]\nsize = {size}\n{table}")
    config = load_config(folder / "kiln.toml")

    started = time.perf_counter()
    variants, promoted_ids = optimize(config, checkpoint, "detector")
    daemon_seconds = time.perf_counter() - started
    rows = []
    for v in sorted(variants, key=lambda v: (v["status"] != "succeeded", v["variant"])):
        metrics = v.get("metrics") or {}
        p50 = metrics.get("latency_p50_ms")
        rows.append([v["variant"], v["status"], f"{p50:.1f}" if p50 else "",
                     f"{metrics['quality']:.4f}" if metrics.get("quality") is not None else "",
                     "promoted" if v["id"] in promoted_ids else (v.get("reason") or "")[:70]])
    print_table(f"{args.model}: every recipe of the default config ({daemon_seconds:.0f} s from drop to the last "
                "job)", rows, ["variant", "status", "p50 ms (daemon)", "quality", "promoted / reason"])
    ran = sum(v["status"] == "succeeded" for v in variants)
    print(f"\nrecipes run: {ran} of {len(variants)} variants succeeded "
          f"({sum(v['status'] == 'skipped' for v in variants)} skipped)")

    served = next(v for v in variants if v["id"] in promoted_ids and v["target"] == "cpu")
    calibration = load_images(checkpoint / "calibration", images)
    peer, peer_seconds = peer_quantize_static(model, calibration, input_name, work)
    test_folder = work / "held-out-folder"
    test_folder.mkdir()
    for path in held_out:
        shutil.copy(path, test_folder / path.name)
    test = load_images(test_folder, images)

    def session(path: Path, settings: dict | None = None):
        return ort.InferenceSession(str(path), session_options(settings, 2), providers=["CPUExecutionProvider"])

    served_path = Path(served["path"])
    serving = served_path / "serving.json"
    settings = json.loads(serving.read_text()).get("session") if serving.exists() else None
    sessions = {"onnxruntime fp32 (the checkpoint)": session(model),
                f"promoted: {served['variant']}": session(served_path / served["file"], settings),
                "onnxruntime quantize_static (QDQ, per-channel)": session(peer)}
    if settings:  # the peer with the promoted variant's session settings too, for a like-for-like figure
        sessions["onnxruntime quantize_static, promoted's session settings"] = session(peer, settings)
    for v in variants:  # every other int8 variant, as serving code loads it
        if v["status"] == "succeeded" and v["runtime"] == "onnxruntime" and "int8" in v["recipe"] \
                and v["id"] != served["id"]:
            extra = Path(v["path"]) / "serving.json"
            sessions[v["variant"]] = session(Path(v["path"]) / v["file"],
                                             json.loads(extra.read_text()).get("session") if extra.exists() else None)
    outputs = {label: np.stack([s.run(None, {input_name: test[i:i + 1]})[0].ravel() for i in range(len(test))])
               for label, s in sessions.items()}
    reference = outputs["onnxruntime fp32 (the checkpoint)"].astype(np.float64)
    times = {label: [] for label in sessions}
    for r in range(args.rounds):
        for label, s in sessions.items():  # in turns: a busy moment of the host falls on every one
            feed = {input_name: test[r % len(test)][None]}
            begin = time.perf_counter()
            s.run(None, feed)
            times[label].append((time.perf_counter() - begin) * 1e3)
    fp32 = float(np.median(times["onnxruntime fp32 (the checkpoint)"]))
    table_rows = []
    for label, raw in outputs.items():
        out = raw.astype(np.float64)
        cosine = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        ms = float(np.median(times[label]))
        table_rows.append([label, f"{ms:.1f}", f"{fp32 / ms:.2f}x", f"{np.nanmin(cosine):.4f}", f"{np.nanmean(cosine):.4f}"])
    cpu, flags = cpu_model_and_flags()
    print_table(f"{args.model}: {HELD_OUT} held-out crops, batch 1, 2 threads, {args.rounds} interleaved rounds "
                f"({cpu}; {', '.join(flags)}); the peer took {peer_seconds:.0f} s to build",
                table_rows, ["model", "p50 ms", "vs fp32", "worst cosine", "mean cosine"])
    served_record = served["lineage"][-1]["record"] if served["lineage"] else {}
    print("\npromoted variant's lineage record:", json.dumps(served_record, indent=1)[:2500])


if __name__ == "__main__":
    main()
