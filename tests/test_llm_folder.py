"""A causal LM's variant as LLM servers load it: a Hugging Face folder, quantized weights
in the compressed-tensors format, programs that hold no second copy of the weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_decoding import tiny_llama

SPEC = dict(name="input_ids", shape=(-1, 16), dtype="int64", high=256, dims=("batch", "sequence"),
            limits=(("sequence", 128),))


def _saved(tmp_path, recipe_step=None, params=None):
    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.targets.torchrt import TorchRuntime

    model = ModelHandle(TORCH, hf_wrapper(tiny_llama()), [InputSpec(**SPEC)])
    if recipe_step is not None:
        model = recipe_step.apply(model, params, StepContext(tmp_path, "cpu", "torch", "cpu", 1, {}))
    out = tmp_path / "variant"
    out.mkdir()
    return out, TorchRuntime().save(model, out)


def test_packing_is_the_compressed_tensors_layout():
    from modelkiln.targets.compressed import pack_int32, unpack_int32

    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(0)
    for bits in (4, 8):
        values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, 40), dtype=torch.int8)
        for dim in (0, 1):
            packed = pack_int32(values, bits, dim)
            assert torch.equal(packed, helpers.pack_to_int32(values, bits, packed_dim=dim))
            assert torch.equal(unpack_int32(packed, bits, values.shape[dim], dim), values)


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_loads_the_folder_and_answers_as_the_measured_program(tmp_path, bits):
    """The folder alone, through AutoModelForCausalLM (compressed-tensors for the int4 and
    int8 weights), gives the logits the torch runtime's programs give; those programs hold
    no copy of the weights."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from modelkiln.steps.weight_only import WeightOnly
    from modelkiln.targets.torchrt import TorchRuntime

    step = WeightOnly() if bits else None
    out, file = _saved(tmp_path, step, {"bits": bits, "block_size": 32})
    serving = json.loads((out / "serving.json").read_text())
    weights = serving["weights"]
    assert weights["format"] == "huggingface" and weights["readers"][0].startswith("transformers")
    # quantize.weight_only quantizes the output head too, which vLLM and SGLang do not read
    assert "vLLM" not in weights["readers"] and "lm_head" in weights["not_read_by"]["vLLM, SGLang"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    config = json.loads((out / "config.json").read_text())
    if bits:
        quantization = config["quantization_config"]
        assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(quantization)  # the package's own reading of it
        (group,) = quantization["config_groups"].values()
        assert group["weights"]["num_bits"] == bits and group["weights"]["symmetric"]
        assert group["weights"]["strategy"] == ("group" if bits == 4 else "channel")
        assert "model.layers.0.mlp.down_proj.weight_packed" in index["weight_map"]
        assert weights["quantization"]["format"] == "compressed-tensors"
    else:
        assert "quantization_config" not in config and weights["quantization"] is None
    # The weights are in the shards, not again in the programs: every stored tensor is
    # one the programs take from the folder when they load (as it is, concatenated with
    # its siblings, or as a kernel's packing of it).
    for sources in (serving["program_weights"], serving["decode"]["program_weights"]):
        taken = set()
        for source in sources.values():
            taken.update(source.get("concat", [source.get("tensor")]))
            if "layer" in source:
                taken.update(n for n in index["weight_map"] if n.rsplit(".", 1)[0] == source["layer"])
        assert set(index["weight_map"]) - taken <= {n for n in index["weight_map"] if n.endswith("weight_shape")}

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16)))
    run = TorchRuntime().load(out, file, "cpu", 1)
    measured = run({"input_ids": ids.numpy()})
    folder = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.inference_mode():
        loaded = folder(ids).logits.float().numpy()
    np.testing.assert_allclose(loaded, measured, atol=1e-4, rtol=1e-4)
    assert run.time_decoding()["decode_ms_per_token"] > 0  # the decoding program, refilled too


def test_weights_without_a_compressed_tensors_form_are_said_so_and_not_written(tmp_path):
    from modelkiln.targets.hf_folder import save

    model = tiny_llama()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    described, stored = save(quantized, tmp_path)
    assert described["format"] is None and not stored
    assert "has no compressed-tensors" in described["reason"] and "q_proj" in described["reason"]
    assert list(tmp_path.iterdir()) == []
    # A model whose shape a step changed without its config: no folder would load.
    model.model.layers = model.model.layers[:1]
    described, _ = save(model, tmp_path)
    assert described["format"] is None and "do not match its config" in described["reason"]
    assert list(tmp_path.iterdir()) == []


def check_llm_folders(config, variants, device="cpu", target="cpu"):
    """Every causal-LM variant of a daemon run is a folder transformers loads (on the
    CPU), and its next-token logits on the measured samples agree with what modelkiln
    measured (on ``device``) within the gate's tolerance; the promoted one too."""
    from transformers import AutoModelForCausalLM

    from modelkiln.config import PolicyConfig
    from modelkiln.targets.quality import NEXT_TOKEN_TOP1, perplexity, score
    from modelkiln.targets.torchrt import TorchRuntime

    tolerance = PolicyConfig().max_quality_drop
    ids = np.random.default_rng(1).integers(0, 256, (8, 24))
    for variant in variants:
        folder = Path(variant["path"])
        document = json.loads((folder / "variant.json").read_text())
        assert document["weights"]["format"] == "huggingface", document["weights"]
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"):
            assert (folder / name).is_file(), name
        measured = TorchRuntime().load(folder, document["file"], device, 1)({"input_ids": ids})
        with torch.inference_mode():
            loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(torch.from_numpy(ids)).logits
        loaded = loaded.float().numpy()
        if device == "cpu":
            assert score(NEXT_TOKEN_TOP1, loaded, measured, None) >= 1 - tolerance
        else:  # 16-bit kernels of two devices: near-ties may flip, the distributions agree
            assert abs(perplexity(measured, ids) / perplexity(loaded, ids) - 1) <= tolerance
    promoted = config.promoted_path / "llm" / target
    assert AutoModelForCausalLM.from_pretrained(str(promoted)) is not None


def test_large_weights_are_split_into_shards_with_their_index(tmp_path):
    from transformers import AutoModelForCausalLM

    from modelkiln.targets.hf_folder import save

    model = tiny_llama()
    described, stored = save(model, tmp_path, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(stored) and described["files"][3:] == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    ids = torch.randint(0, 256, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(tmp_path))(ids).logits, model(ids).logits)


@pytest.mark.parametrize("inputs", [True, False], ids=["w8a8", "w8a16"])
def test_fp8_weights_are_stored_as_compressed_tensors_reads_them(tmp_path, inputs):
    """FP8 layers (built here on the CPU, whose FP8 product torch emulates; the steps
    themselves are for GPUs of compute capability 8.9+) are stored as they are, in the
    float-quantized (W8A8) or naive-quantized (W8A16) format; transformers loads the
    folder, the measured program answers from it, and the head stays in float."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.steps import fp8
    from modelkiln.targets.torchrt import TorchRuntime

    context = StepContext(tmp_path, "cpu", "torch", "cpu", 1, {})
    model = fp8.convert(ModelHandle(TORCH, hf_wrapper(tiny_llama()), [InputSpec(**SPEC)]), context, inputs)
    assert context.record["float_layers"] == {"inner.lm_head": "the model's head"}
    out = tmp_path / "variant"
    out.mkdir()
    file = TorchRuntime().save(model, out)
    weights = json.loads((out / "serving.json").read_text())["weights"]
    assert "vLLM" in weights["readers"] and "not_read_by" not in weights
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(quantization)
    (group,) = quantization["config_groups"].values()
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert quantization["format"] == ("float-quantized" if inputs else "naive-quantized")
    assert (group["input_activations"] or {}).get("strategy") == ("token" if inputs else None)
    assert quantization["ignore"] == ["lm_head"]
    from modelkiln.targets.hf_folder import load_state

    stored = load_state(out)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["lm_head.weight"].dtype == torch.float32

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16)))
    run = TorchRuntime().load(out, file, "cpu", 1)
    measured = run({"input_ids": ids.numpy()})
    with torch.inference_mode():
        expected = model.obj(ids)
        loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits.float().numpy()
    np.testing.assert_allclose(measured, (expected[0] if isinstance(expected, tuple) else expected).numpy(),
                               atol=1e-5)
    # transformers widens the FP8 weights back to float; only W8A8's input rounding differs.
    np.testing.assert_allclose(loaded, measured, atol=2e-2 if inputs else 1e-4)
    assert run.time_decoding()["decode_ms_per_token"] > 0


def test_fp8_steps_are_skipped_off_an_fp8_gpu_with_the_reason(tmp_path):
    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle, StepContext
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.steps.fp8 import Fp8, Fp8WeightOnly

    model = ModelHandle(TORCH, hf_wrapper(tiny_llama()), [InputSpec(**SPEC)])
    for step in (Fp8(), Fp8WeightOnly()):
        with pytest.raises(StepNotApplicable, match="compute capability 8.9"):
            step.apply(model, {}, StepContext(tmp_path, "cpu", "torch", "cpu", 1, {}))


def test_int4_layers_on_the_stored_form_take_their_weights_from_the_folder(tmp_path):
    """The cuda int4 layer that runs modelkiln's int4_mm on the compressed-tensors form
    (built here on the CPU, where the op multiplies in torch): its program stores neither
    the packed weights nor the scales, they come from the folder when it loads, and it
    answers as the layer did; serving.json says how to load the op."""
    from modelkiln.plugins.api import TORCH, InputSpec, ModelHandle
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.steps.weight_only import _int4_stored_layer_class
    from modelkiln.targets.kernels import int4
    from modelkiln.targets.torchrt import TorchRuntime

    lm = tiny_llama()
    layer_class = _int4_stored_layer_class()
    names = [name for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    for name in names:
        lm.set_submodule(name, layer_class(lm.get_submodule(name), 32, "cpu"))
    model = ModelHandle(TORCH, hf_wrapper(lm), [InputSpec(**SPEC)], {int4.SERVING_KEY: True})
    out = tmp_path / "variant"
    out.mkdir()
    file = TorchRuntime().save(model, out)
    serving = json.loads((out / "serving.json").read_text())
    assert "register_op" in serving["int4_mm"]["load"]
    sources = serving["program_weights"]
    packed = "inner.model.layers.0.self_attn.q_proj.weight_packed"
    assert sources[packed] == {"tensor": packed.split(".", 1)[1]}
    assert sources[packed.replace("packed", "scale")]["derive"] == "int4_stored_scales"
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 16)))
    with torch.inference_mode():
        expected = model.obj(ids)
    measured = TorchRuntime().load(out, file, "cpu", 1)({"input_ids": ids.numpy()})
    np.testing.assert_allclose(measured, (expected[0] if isinstance(expected, tuple) else expected).numpy(),
                               atol=1e-4)
