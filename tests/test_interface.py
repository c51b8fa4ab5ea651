"""The artifact is the product: a promoted encoder folder is what serving code needs.

A tiny BERT encoder with its own tokenizer goes through the daemon; its promoted folder
is then loaded the way a serving team would, with plain onnxruntime and
``torch.export.load`` and the tokenizer found beside the model, and called with the
model's real inputs: sentences of different lengths, padded into one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import optimize_once
from modelkiln.store import queries, views
from modelkiln.store.db import open_store

WORDS = ("the a model serves fast slow kiln quantized weights tokens sentence batch padding "
         "host daemon checkpoint promoted variant measured latency quality cosine").split()
SENTENCES = [
    "the model serves fast",
    "a quantized model serves tokens",
    "the daemon measured the latency of every variant on the host",
    "padding",
    "the kiln promoted a variant whose quality kept the cosine of the checkpoint",
    "weights",
]


def tiny_encoder(folder: Path) -> Path:
    """A 2-block BERT encoder (no head: hidden states out) with a word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=48).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=48)
    BertModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    lines = [json.dumps({"text": s}) for s in SENTENCES * 4]
    (folder / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    keep = mask[..., None].astype(np.float64)
    return (hidden * keep).sum(1) / keep.sum(1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.slow
def test_a_promoted_encoder_folder_serves_padded_batches_of_any_length_without_modelkiln(config, tmp_path):
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = tiny_encoder(tmp_path / "encoder")
    checkpoint = optimize_once(config, folder, "encoder")
    assert checkpoint.status == "done", checkpoint.reason
    assert checkpoint.info["sample_source"] == "calibration.jsonl"
    assert checkpoint.info["quality_metric"] == "pooled_cosine"
    assert checkpoint.info["lengths"]["median"] < checkpoint.info["lengths"]["max"]
    store = open_store(config)
    with store.session() as session:
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, "encoder")]
    store.dispose()
    assert {v["variant"] for v in variants if v["status"] == "succeeded"} >= {
        "onnxruntime:baseline", "torch:baseline", "onnxruntime:quantize.int8_dynamic"}

    original = BertModel.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    with torch.inference_mode():
        expected = pooled(original(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy(),
                          batch["attention_mask"])

    for runtime in ("onnxruntime", "torch"):
        path = Path([v for v in variants if v["variant"] == f"{runtime}:baseline"][0]["path"])
        meta = json.loads((path / "variant.json").read_text())
        assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(i["shape"] == ["batch", "sequence"] for i in meta["inputs"])
        assert meta["outputs"] == [{"name": "last_hidden_state", "dtype": "float32",
                                    "shape": ["batch", "sequence", 32]}]
        assert {"tokenizer.json", "vocab.txt", "config.json"} <= set(meta["serving_files"])
        assert meta["metrics"]["sequence"]["median_length"] < meta["metrics"]["sequence"]["max_length"]
        # Serving code: the tokenizer beside the model, the runtime's own loader.
        served_tokenizer = AutoTokenizer.from_pretrained(str(path))
        if runtime == "onnxruntime":
            session = ort.InferenceSession(str(path / meta["file"]), providers=["CPUExecutionProvider"])
            assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]

            def run(feed, session=session):
                return session.run(["last_hidden_state"], dict(feed))[0]
        else:
            module = torch.export.load(str(path / meta["file"])).module()

            def run(feed, module=module, meta=meta):
                with torch.inference_mode():
                    return module(*(torch.from_numpy(feed[i["name"]]) for i in meta["inputs"])).numpy()

        padded = served_tokenizer(SENTENCES, padding=True, return_tensors="np")
        got = pooled(run(padded), padded["attention_mask"])
        assert cosine(got, expected).min() >= 0.999
        # Each sentence alone, at its own length: the same embedding as in the padded batch.
        for i, sentence in enumerate(SENTENCES):
            alone = served_tokenizer([sentence], return_tensors="np")
            assert cosine(pooled(run(alone), alone["attention_mask"])[0], got[i]) >= 0.999

    # int8 with one activation scale per token: a sentence's embedding does not move with
    # its batch company either (the gate checks it, policy.min_batch_agreement).
    int8 = next(v for v in variants if v["variant"] == "onnxruntime:quantize.int8_dynamic")
    assert int8["metrics"]["checks"]["padded_vs_alone_min_cosine"] >= 0.999
    assert int8["lineage"][-1]["record"]["activations"] == "per_row"
    session = ort.InferenceSession(str(Path(int8["path"]) / "model.onnx"), providers=["CPUExecutionProvider"])
    padded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    batched = pooled(session.run(None, dict(padded))[0], padded["attention_mask"])
    for i, sentence in enumerate(SENTENCES):
        alone = tokenizer([sentence], return_tensors="np")
        assert cosine(pooled(session.run(None, dict(alone))[0], alone["attention_mask"])[0], batched[i]) >= 0.9999


def recurrent_onnx(folder: Path) -> Path:
    """A voice-activity-detector-shaped ONNX model, as Silero VAD's inputs are: audio
    ``input`` [batch, samples], a recurrent ``state`` [2, batch, 128] (the batch in the
    middle) and the sample rate ``sr`` as a scalar int64; outputs ``output`` [batch, 8] and
    the next state (``output``: scores over 8 classes, so quality is top-1 agreement)."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frame, self.mix, self.out = torch.nn.Linear(64, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 8)
            torch.nn.init.normal_(self.out.weight, std=1.0)  # decided scores, not random near-ties

        def forward(self, input, state, sr):
            frames = input.reshape(input.shape[0], -1, 64)
            hidden = torch.tanh(self.frame(frames).mean(1) + self.mix(state[0]) * (sr.float() / 16000.0))
            return self.out(hidden), torch.stack([hidden, state[1]])

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    example = (torch.randn(2, 512), torch.zeros(2, 2, 128), torch.tensor(16000))
    torch.onnx.export(Detector().eval(), example, str(folder / "model.onnx"), dynamo=False,
                      input_names=["input", "state", "sr"], output_names=["output", "stateN"],
                      dynamic_axes={"input": {0: "batch", 1: "samples"}, "state": {1: "batch"},
                                    "output": {0: "batch"}, "stateN": {1: "batch"}})
    return folder


def test_a_recurrent_onnx_model_with_its_batch_in_the_middle_and_a_scalar_input(config, tmp_path):
    """Each input's batch is found from the graph's own dimension names (state's is its
    dimension 1), a scalar input is fed as one value, data files hold each input as the
    model takes it, and without data the scalar's value is asked for, not made up."""
    import onnxruntime as ort

    from modelkiln.plugins.api import batch_axes

    assert batch_axes({"input": [None, None], "state": [2, None, 128], "sr": []}) == {
        "input": 0, "state": 1, "sr": None}  # unnamed dimensions: each input's first that varies
    assert batch_axes({"ids": ["b", "s"], "mask": ["b", "s"], "state": [2, "b", 8]}) == {"ids": 0, "mask": 0, "state": 1}

    bare = recurrent_onnx(tmp_path / "bare")
    checkpoint = optimize_once(config, bare, "vad")
    assert checkpoint.status == "rejected"
    assert "takes sr as a scalar input, whose value cannot be made up; ship calibration.npz" in checkpoint.reason

    folder = recurrent_onnx(tmp_path / "vad")
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((32, 512)).astype(np.float32)
    state = (0.5 * rng.standard_normal((2, 32, 128))).astype(np.float32)
    np.savez(folder / "calibration.npz", input=audio, state=state, sr=np.array(16000, np.int64))
    checkpoint = optimize_once(config, folder, "vad", version="2")
    assert checkpoint.status == "done", checkpoint.reason
    store = open_store(config)
    with store.session() as session:
        variants = {v["variant"]: v for v in map(views.variant_dict, queries.variants_of_model(session, "vad"))}
        (served,) = [views.variant_dict(p.variant) for p in queries.current_promotions(session)]
    store.dispose()
    int8 = variants["onnxruntime:quantize.int8_dynamic"]
    assert int8["status"] == "succeeded", int8["reason"]
    assert int8["lineage"][-1]["record"]["quantized_nodes"] == 3, int8["lineage"][-1]["record"]

    # The promoted folder as serving code loads it: the model's own layout, three requests.
    path = Path(served["path"])
    meta = json.loads((path / "variant.json").read_text())
    assert [(i["name"], i["shape"], i["dtype"]) for i in meta["inputs"]] == [
        ("input", ["batch", "samples"], "float32"), ("state", [2, "batch", 128], "float32"), ("sr", [], "int64")]
    session = ort.InferenceSession(str(path / meta["file"]), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input": audio[:3], "state": np.ascontiguousarray(state[:, :3]), "sr": np.array(16000, np.int64)}
    got, expected = session.run(["output"], feed)[0], original.run(["output"], feed)[0]
    assert got.shape == (3, 8) and np.abs(got - expected).max() < 0.02 * np.abs(expected).max()
