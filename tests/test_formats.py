"""Each built-in format loads a real checkpoint, and refuses what it cannot read safely."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from helpers import tiny_mlp
from modelkiln.config import ArchitectureConfig
from modelkiln.errors import CheckpointRejected
from modelkiln.plugins.api import LoadContext
from modelkiln.registry.data import load_eval
from modelkiln.registry.formats import (
    HuggingFaceFormat,
    OnnxFormat,
    SafetensorsFormat,
    StateDictFormat,
    detect_format,
    kiln_checkpoint_formats,
)

ARCH = LoadContext("tiny", ArchitectureConfig(factory="helpers:tiny_mlp", input_shape=[16]))


def export_onnx(folder):
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(tiny_mlp().eval(), (torch.randn(2, 16),), str(folder / "model.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}})
    return folder


@pytest.mark.hooks("kiln_checkpoint_formats")
def test_detection_by_file_names():
    formats = kiln_checkpoint_formats()
    assert detect_format(formats, ["model.onnx", "eval.npz"]).name == "onnx"
    assert detect_format(formats, ["config.json", "model.safetensors"]).name == "huggingface"
    assert detect_format(formats, ["model.safetensors", "eval.npz"]).name == "safetensors"
    assert detect_format(formats, ["weights.pth"]).name == "state_dict"
    assert detect_format(formats, ["notes.txt", "eval.npz"]) is None
    assert detect_format(formats, []) is None


def test_onnx_loads_with_its_inputs(tmp_path):
    loaded = OnnxFormat().load(export_onnx(tmp_path / "m"), ARCH)
    assert [(i.name, i.shape, i.dtype) for i in loaded.inputs] == [("x", (-1, 16), "float32")]


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "link.bin"])
def test_onnx_external_data_outside_the_folder_is_rejected(tmp_path, location):
    import onnx
    from onnx.external_data_helper import set_external_data

    folder = export_onnx(tmp_path / "m")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    model = onnx.load(str(folder / "model.onnx"))
    tensor = model.graph.initializer[0]
    set_external_data(tensor, location=location, offset=0, length=16)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(folder / "model.onnx"))
    with pytest.raises(CheckpointRejected, match="outside the checkpoint folder"):
        OnnxFormat().load(folder, ARCH)


def test_truncated_onnx_is_rejected(tmp_path):
    folder = export_onnx(tmp_path / "m")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointRejected):
        OnnxFormat().load(folder, ARCH)


def test_safetensors_with_factory(tiny_checkpoint):
    loaded = SafetensorsFormat().load(tiny_checkpoint, ARCH)
    assert loaded.module(torch.randn(3, 16)).shape == (3, 4)
    assert loaded.inputs[0].shape == (-1, 16)


def test_safetensors_without_factory_says_what_to_configure(tiny_checkpoint):
    with pytest.raises(CheckpointRejected, match=r"\[architectures.tiny\]"):
        SafetensorsFormat().load(tiny_checkpoint, LoadContext("tiny", None))


def test_weights_that_do_not_fit_the_factory_are_rejected(tiny_checkpoint):
    ctx = LoadContext("tiny", ArchitectureConfig(factory="modelkiln.demo:digits_mlp", input_shape=[64]))
    with pytest.raises(CheckpointRejected, match="do not fit"):
        SafetensorsFormat().load(tiny_checkpoint, ctx)


def test_safetensors_header_past_the_end_is_rejected(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointRejected, match="not a valid safetensors"):
        SafetensorsFormat().load(folder, ARCH)


def test_state_dict_loads_weights_only(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save(tiny_mlp().state_dict(), folder / "model.pt")
    loaded = StateDictFormat().load(folder, ARCH)
    assert loaded.format == "state_dict"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"weight": Evil(str(marker))}, folder / "model.pt")  # zip-format .pt
    with pytest.raises(CheckpointRejected, match="weights-only") as raised:
        StateDictFormat().load(folder, ARCH)
    # What was refused (the global it would call), never torch's advice to load it unsafely.
    reason = str(raised.value)
    assert "GLOBAL io.open" in reason and "weights_only" not in reason and "safe_globals" not in reason
    (folder / "model.pt").write_bytes(pickle.dumps(Evil(str(marker))))  # legacy pickle
    with pytest.raises(CheckpointRejected):
        StateDictFormat().load(folder, ARCH)
    assert not marker.exists()


def tiny_bert(folder, **extra):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(str(folder), safe_serialization=True)
    if extra:
        import json

        data = json.loads((folder / "config.json").read_text())
        data.update(extra)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_hugging_face_folder_loads_without_remote_code(tmp_path):
    loaded = HuggingFaceFormat().load(tiny_bert(tmp_path / "bert"), LoadContext("bert"))
    # What its serving code passes, in the order of the model's forward, of any length.
    assert [i.name for i in loaded.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert loaded.inputs[0].high == 100 and loaded.output == "logits"
    assert all(i.dims == ("batch", "sequence") and dict(i.limits) == {"sequence": 64} for i in loaded.inputs)
    ids = torch.randint(0, 100, (2, 8))
    assert loaded.module(ids, torch.ones_like(ids), torch.zeros_like(ids)).shape == (2, 3)


def test_hugging_face_models_export_eager_attention_to_onnx(tmp_path):
    # onnxruntime runs the eager attention graph faster than SDPA's; torch keeps SDPA.
    import onnx

    from modelkiln.targets.onnxrt import export_to_onnx

    loaded = HuggingFaceFormat().load(tiny_bert(tmp_path / "bert"), LoadContext("bert"))
    inner = loaded.module.inner
    assert inner.config._attn_implementation == "sdpa"
    from modelkiln.pipeline.samples import generate

    export_to_onnx(loaded.module, loaded.inputs, generate(loaded.inputs, 2), tmp_path / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    # SDPA's export guards fully masked rows with IsNaN/Where around the Softmax; the
    # eager attention graph has no such guard.
    assert "Softmax" in ops and "IsNaN" not in ops
    assert inner.config._attn_implementation == "sdpa"


def test_hugging_face_folder_asking_for_remote_code_is_rejected(tmp_path):
    folder = tiny_bert(tmp_path / "bert", auto_map={"AutoModel": "evil.Model"})
    with pytest.raises(CheckpointRejected, match="remote code"):
        HuggingFaceFormat().load(folder, LoadContext("bert"))


def test_eval_data_with_pickled_objects_is_rejected(tmp_path):
    np.savez(tmp_path / "eval.npz", inputs=np.array([{"a": 1}], dtype=object), labels=np.array([1]))
    with pytest.raises(CheckpointRejected, match="pickled objects"):
        load_eval(tmp_path)


def test_eval_data_with_mismatched_rows_is_rejected(tmp_path):
    np.savez(tmp_path / "eval.npz", inputs=np.zeros((4, 2), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(CheckpointRejected, match="must match"):
        load_eval(tmp_path)


def test_corrupt_eval_file_is_rejected(tmp_path):
    (tmp_path / "eval.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointRejected, match="eval.npz"):
        load_eval(tmp_path)
    assert not zipfile.is_zipfile(tmp_path / "eval.npz")


def test_a_torchscript_archive_is_rejected_with_what_to_ship_instead(tmp_path):
    torch.jit.save(torch.jit.script(tiny_mlp()), str(tmp_path / "model.pt"))
    with pytest.raises(CheckpointRejected) as raised:
        StateDictFormat().load(tmp_path, LoadContext("tiny"))
    reason = str(raised.value)
    assert "TorchScript archive" in reason and "model.safetensors" in reason and "model.onnx" in reason
    assert "weights_only=False" not in reason  # torch's own advice, never to be taken on such a file


def test_a_hugging_face_checkpoint_is_read_in_its_own_dtype(tmp_path):
    """A bf16 causal LM stays bf16 (a 7B model read as float32 would need twice its size
    in host memory before it reached a GPU)."""
    from test_decoding import tiny_llama

    tiny_llama().to(torch.bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
    loaded = HuggingFaceFormat().load(tmp_path, LoadContext("llm"))
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
