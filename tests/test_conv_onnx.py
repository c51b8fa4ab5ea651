"""ONNX conv nets, as vision models are exported: a small detector-shaped net (Conv with
BatchNorm, SiLU, a ConvTranspose upsampling, a dense map out) exported at opset 12 goes
through the daemon with static and dynamic int8, and the promoted folder is served by
plain onnxruntime; a variant whose session settings were chosen by timing is served with
them from its serving.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import optimize_once
from test_pipeline import all_variants


def conv_detector(folder: Path, opset: int = 12) -> Path:
    """A 3x32x32 -> 6x16x16 map net, exported with its batch dynamic, with calibration
    images that have structure (smooth blobs), not noise."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            def block(i, o, stride):
                return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(o),
                                           torch.nn.SiLU())
            self.stem, self.down, self.mid = block(3, 16, 2), block(16, 32, 2), block(32, 32, 1)
            self.up = torch.nn.ConvTranspose2d(32, 16, 2, 2)
            self.head = torch.nn.Conv2d(32, 6, 1)

        def forward(self, images):
            stem = self.stem(images)
            return self.head(torch.cat([stem, self.up(self.mid(self.down(stem)))], 1))

    torch.manual_seed(0)
    net = Detector()
    for module in net.modules():  # running statistics a trained net would have, so BatchNorm is not a no-op
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    net.eval()
    folder.mkdir(parents=True)
    torch.onnx.export(net, (torch.zeros(2, 3, 32, 32),), str(folder / "model.onnx"), dynamo=False,
                      opset_version=opset, input_names=["images"], output_names=["maps"],
                      dynamic_axes={"images": {0: "batch"}, "maps": {0: "batch"}})
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32)))
    images = []
    for _ in range(48):
        centre, width = rng.uniform(-0.8, 0.8, (3, 2, 1, 1)), rng.uniform(0.2, 0.6, (3, 1, 1))
        blobs = np.exp(-((grid[None] - centre) ** 2).sum(1) / width ** 2)
        images.append(2 * blobs - 1 + 0.05 * rng.standard_normal((3, 32, 32)))
    np.savez(folder / "calibration.npz", images=np.asarray(images, np.float32))
    return folder


@pytest.fixture
def conv_config(kiln_dir):
    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text()
    text = re.sub(r'(?m)^recipes = \[[^\]]*\]',
                  'recipes = ["baseline", "quantize.int8_static", "quantize.int8_dynamic", '
                  '"compile.onnxruntime(seconds=0.5)"]', text)
    text = text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["onnxruntime"]')
    (kiln_dir / "kiln.toml").write_text(text)
    return load_config(kiln_dir / "kiln.toml")


def test_a_conv_net_gets_static_and_dynamic_int8_and_serves_from_plain_onnxruntime(conv_config, tmp_path):
    import onnxruntime as ort

    from modelkiln.targets.onnxrt import session_options

    folder = conv_detector(tmp_path / "detector")
    checkpoint = optimize_once(conv_config, folder, "detector", timeout=240)
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(conv_config, "detector")}
    baseline = by_name["onnxruntime:baseline"]

    static = by_name["onnxruntime:quantize.int8_static"]
    assert static["status"] == "succeeded", static.get("reason")
    record = static["lineage"][-1]["record"]
    # Opset 12 has no per-channel DequantizeLinear: raised first, then pre-processed.
    assert record["prepared"][0] == "opset 12 raised to 13", record["prepared"]
    # Each form was built and scored; those that kept the gate were timed against float,
    # and the one kept is the fastest of them.
    forms = record["int8_forms"]
    assert set(forms) >= {"qdq", "qdq, all operators", "qoperator, all operators"}
    passing = {name: figures["ms"] for name, figures in forms.items() if figures.get("passes")}
    assert record["form"] in passing
    if len(passing) > 1:
        assert passing[record["form"]] == min(passing.values()) and "ms" in forms["float"]
    # The kept form calibrated by every method, the best scored kept: no kernel changes.
    methods = record["calibration_methods"]
    assert set(methods) == {"MinMax", "Entropy", "Percentile"} and methods[record["method"]] == max(methods.values())
    graph = onnx.load(f"{static['path']}/{static['file']}").graph
    quantized_convs = [n for n in graph.node if n.op_type in ("QLinearConv", "Conv")]
    assert quantized_convs and record["quantize_nodes"] > 0
    assert static["metrics"]["quality"] >= baseline["metrics"]["quality"] - 0.01

    dynamic = by_name["onnxruntime:quantize.int8_dynamic"]
    assert dynamic["status"] == "succeeded", dynamic.get("reason")
    record = dynamic["lineage"][-1]["record"]
    graph = onnx.load(f"{dynamic['path']}/{dynamic['file']}").graph
    # Every Conv (not the ConvTranspose: onnxruntime has no integer form of it) in int8.
    assert sum(n.op_type == "ConvInteger" for n in graph.node) == 4 == record["quantized_nodes"]
    assert record["conv_activations"] == "per_tensor" and record["int8_form"] in ("u8s8", "u8s7")

    tuned = by_name["onnxruntime:compile.onnxruntime(seconds=0.5)"]
    assert tuned["status"] == "succeeded", tuned.get("reason")
    record = tuned["lineage"][-1]["record"]
    # onnxruntime's defaults, one thread, no spinning, the parallel executor: each timed.
    assert len(record["session_ms"]) == 4 and record["session"] in record["session_ms"]
    before, after = map(int, record["offline_optimization"].split(" nodes -> "))
    assert after < before  # BatchNorm folded into the Convs, at least
    settings = json.loads((Path(tuned["path"]) / "serving.json").read_text())["session"]
    assert settings["intra_op_num_threads"] in (1, 2)
    session = ort.InferenceSession(str(Path(tuned["path"]) / tuned["file"]), session_options(settings, 2),
                                   providers=["CPUExecutionProvider"])
    images = np.load(folder / "calibration.npz")["images"][:3]
    original = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"images": images})[0], original.run(None, {"images": images})[0],
                       atol=1e-4)

    # The promoted folder as serving code loads it.
    served = conv_config.promoted_path / "detector" / "cpu"
    meta = json.loads((served / "variant.json").read_text())
    session = ort.InferenceSession(str(served / meta["file"]), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.load(folder / "calibration.npz")["images"][:3]
    got, expected = session.run(None, {"images": images})[0], original.run(None, {"images": images})[0]
    assert got.shape == (3, 6, 16, 16)
    cosine = (got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine > 0.99


IMAGES = """
[architectures.detector.images]
size = [32, 32]
scale = 127.5
mean = [1.0]
std = [1.0]
"""


def test_a_folder_of_images_is_the_calibration_data_as_the_config_declares_it(kiln_dir, tmp_path):
    """PNG and JPEG files of any size in calibration/, read with Pillow, resized, scaled
    and laid out as [architectures.<model>.images] says; without that table the
    checkpoint is refused with what to declare."""
    from PIL import Image

    from modelkiln.config import ConfigError, load_config
    from modelkiln.registry.data import load_images

    folder = conv_detector(tmp_path / "detector")
    shipped = np.load(folder / "calibration.npz")["images"]
    (folder / "calibration.npz").unlink()
    (folder / "calibration").mkdir()
    pixels = np.clip((shipped + 1) * 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i, image in enumerate(pixels[:24]):
        # Shipped at twice the size, half as JPEG: resized to the declared 32 x 32.
        big = Image.fromarray(image).resize((64, 64), Image.BILINEAR)
        big.save(folder / "calibration" / (f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"), quality=95)

    text = (kiln_dir / "kiln.toml").read_text()
    text = re.sub(r'(?m)^recipes = \[[^\]]*\]', """recipes = ["baseline", "quantize.int8_static(form='qdq')"]""", text)
    text = text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["onnxruntime"]')
    (kiln_dir / "kiln.toml").write_text(text)
    bare = optimize_once(load_config(kiln_dir / "kiln.toml"), folder, "detector")
    assert bare.status == "rejected" and "[architectures.<model>.images]" in bare.reason, bare.reason

    (kiln_dir / "kiln.toml").write_text(text + IMAGES.replace("mean = [1.0]", 'channels = "CMYK"'))
    with pytest.raises(ConfigError, match="channels' must be RGB, BGR or L"):
        load_config(kiln_dir / "kiln.toml")
    (kiln_dir / "kiln.toml").write_text(text + IMAGES)
    config = load_config(kiln_dir / "kiln.toml")

    declared = load_images(folder / "calibration", {"size": [32, 32], "scale": 127.5, "mean": [1.0], "std": [1.0]})
    assert declared.shape == (24, 3, 32, 32) and declared.dtype == np.float32
    # Back in the model's range: what was saved, less what 8 bits, JPEG and two resizes cost.
    assert np.abs(declared - shipped[:24]).mean() < 0.05
    assert load_images(folder / "calibration", {"size": [8, 16], "layout": "NHWC", "channels": "L"}).shape == (
        24, 8, 16, 1)

    checkpoint = optimize_once(config, folder, "detector", version="2")
    assert checkpoint.status == "done", checkpoint.reason
    assert checkpoint.info["data_split"]["quality_source"] == "calibration/"
    static = {v["variant"]: v for v in all_variants(config, "detector")}["onnxruntime:quantize.int8_static(form='qdq')"]
    assert static["status"] == "succeeded", static.get("reason")
    record = static["lineage"][-1]["record"]
    assert record["calibration"] == "the checkpoint's calibration data" and record["calibration_rows"] == 24


def test_a_model_exported_for_one_row_at_a_time_is_fed_row_by_row(tmp_path):
    """Detectors are often exported with a batch of 1 fixed in the graph: every batch the
    pipeline runs (reference outputs, quality, timing at batch 8) goes in row by row."""
    import torch

    from modelkiln.targets.onnxrt import session_runner

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "fixed.onnx"), dynamo=False,
                      input_names=["images"], output_names=["maps"])
    images = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    got = session_runner(tmp_path / "fixed.onnx", 1)({"images": images})
    with torch.inference_mode():
        assert np.allclose(got, net(torch.from_numpy(images)).numpy(), atol=1e-5)


def test_an_onnx_conv_net_is_imported_into_torch_for_pruning_and_served_by_torch(kiln_dir, tmp_path):
    """The ONNX graph becomes a torch module (checked against onnxruntime at import):
    the torch runtime serves it, and structured pruning with a recovery fine-tune runs on
    it; a graph with an operator the importer does not take is skipped naming it."""
    import torch

    from modelkiln.config import load_config

    folder = conv_detector(tmp_path / "detector")
    text = (kiln_dir / "kiln.toml").read_text()
    text = re.sub(r'(?m)^recipes = \[[^\]]*\]',
                  'recipes = ["baseline", "prune.structured(amount=0.25, recovery_steps=3)"]', text)
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, folder, "detector", timeout=240)
    assert checkpoint.status == "done", checkpoint.reason
    by_name = {v["variant"]: v for v in all_variants(config, "detector")}
    served_by_torch = by_name["torch:baseline"]
    assert served_by_torch["status"] == "succeeded", served_by_torch.get("reason")
    assert served_by_torch["metrics"]["quality"] > 0.9999
    for runtime in ("onnxruntime", "torch"):
        pruned = by_name[f"{runtime}:prune.structured(amount=0.25, recovery_steps=3)"]
        assert pruned["status"] == "succeeded", pruned.get("reason")
        record = pruned["lineage"][0]["record"]
        assert record["onnx_import"]["matched_onnxruntime_within"] < 1e-3 and record["onnx_import"]["layers"] == 5  # 4 Convs (BatchNorm folded at export), 1 ConvTranspose
        assert record["recovery_steps"] == 3, record
        assert pruned["metrics"]["size_bytes"] < 0.9 * by_name[f"{runtime}:baseline"]["metrics"]["size_bytes"]

    class Gelu(torch.nn.Module):
        def forward(self, x):
            return torch.erf(x) * x

    odd = tmp_path / "odd"
    odd.mkdir()
    torch.onnx.export(Gelu(), (torch.zeros(2, 8),), str(odd / "model.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    np.savez(odd / "calibration.npz", x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    checkpoint = optimize_once(config, odd, "odd")
    assert checkpoint.status == "done", checkpoint.reason
    skipped = {v["variant"]: v for v in all_variants(config, "odd")}["torch:baseline"]
    assert skipped["status"] == "skipped" and "operator Erf is not among those the importer takes" in skipped["reason"]
