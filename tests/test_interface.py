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

            def run(feed):
                return session.run(["last_hidden_state"], dict(feed))[0]
        else:
            module = torch.export.load(str(path / meta["file"])).module()

            def run(feed):
                with torch.inference_mode():
                    return module(*(torch.from_numpy(feed[i["name"]]) for i in meta["inputs"])).numpy()

        padded = served_tokenizer(SENTENCES, padding=True, return_tensors="np")
        got = pooled(run(padded), padded["attention_mask"])
        assert cosine(got, expected).min() >= 0.999
        # Each sentence alone, at its own length: the same embedding as in the padded batch.
        for i, sentence in enumerate(SENTENCES):
            alone = served_tokenizer([sentence], return_tensors="np")
            assert cosine(pooled(run(alone), alone["attention_mask"])[0], got[i]) >= 0.999
