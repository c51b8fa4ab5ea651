"""shard.tensor_parallel: the split plan, and a 2-rank variant through the real pipeline."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import optimize_once
from test_pipeline import all_variants, promoted_entries

RECIPES = 'recipes = ["baseline", "quantize.int8_dynamic"]'


def with_second_target(kiln_dir, text: str, name: str, key: str, value: str):
    """The config of ``text`` plus a copy of its cpu target named ``name`` that differs in
    ``key`` only (set to ``value``), written to ``kiln_dir`` and loaded."""
    from modelkiln.config import load_config

    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    default = next(line for line in cpu.splitlines() if line.startswith(f"{key} = "))
    text += cpu.replace("[targets.cpu]", f"[targets.{name}]").replace(default, f"{key} = {value}")
    (kiln_dir / "kiln.toml").write_text(text)
    return load_config(kiln_dir / "kiln.toml")


class Gated(torch.nn.Module):
    """A Llama-style MLP block: down(silu(gate(x)) * up(x)) with a residual, then a head."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(16, 32, bias=False)
        self.up = torch.nn.Linear(16, 32, bias=False)
        self.down = torch.nn.Linear(32, 16, bias=False)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)))


class Escaping(torch.nn.Module):
    """The hidden activations are read outside the chain: no split is valid."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.c = torch.nn.Linear(32, 4)

    def forward(self, x):
        hidden = torch.relu(self.a(x))
        return self.b(hidden).sum(-1, keepdim=True) + self.c(hidden)


def _splits(module, ranks=2):
    from modelkiln.steps.shard import find_splits

    return [s.as_dict() for s in find_splits(module.eval(), (torch.randn(2, 16),), ranks)]


def test_the_plan_pairs_column_and_row_parallel_linears():
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 64),
                        nn.Tanh(), nn.Linear(64, 4))
    # Linear 2 is already a row of the first chain, so the second chain starts at Linear 4.
    assert _splits(mlp) == [{"columns": ["0"], "row": "2", "width": 32},
                            {"columns": ["4"], "row": "6", "width": 64}]
    assert _splits(Gated()) == [{"columns": ["up", "gate"], "row": "down", "width": 32}]
    assert _splits(Escaping()) == []
    assert _splits(Gated(), ranks=3) == []  # 32 does not divide by 3


def test_a_two_rank_variant_equals_the_unsharded_model(kiln_dir, digits_checkpoint):
    from modelkiln.targets import sharded

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "shard.tensor_parallel", "shard.tensor_parallel -> quantize.int8_dynamic"]'))
    # A second target, alike but for its two devices: the same recipes are skipped on the first.
    config = with_second_target(kiln_dir, text, "cpu2", "devices", "2")
    checkpoint = optimize_once(config, digits_checkpoint, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    variants = {(v["target"], v["variant"]): v for v in all_variants(config, "digits")}

    shard = variants["cpu2", "torch:shard.tensor_parallel"]
    assert shard["status"] == "succeeded", shard.get("reason")
    record = shard["lineage"][0]["record"]
    assert record["ranks"] == 2 and record["splits"] == [{"columns": ["0"], "row": "2", "width": 512}]
    assert record["parameters_per_rank"] < 0.6 * (record["split_parameters"] + record["replicated_parameters"])
    # The equality check ran when the measurement loaded the ranks; variant.json keeps it.
    document = json.loads((Path(shard["path"]) / "variant.json").read_text())
    check = document["metrics"]["checks"]["shard_check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["rows"] > 0
    assert shard["metrics"]["quality"] == variants["cpu2", "torch:baseline"]["metrics"]["quality"]
    artifact = {p.relative_to(shard["path"]).as_posix() for p in Path(shard["path"]).rglob("*")}
    assert {"plan.json", "rank0/model.pt2", "rank1/model.pt2", "check.npz"} <= artifact

    assert variants["cpu2", "onnxruntime:shard.tensor_parallel"]["status"] == "skipped"
    one = variants["cpu", "torch:shard.tensor_parallel"]
    assert one["status"] == "skipped" and "devices = 1" in one["reason"]
    after = variants["cpu2", "torch:shard.tensor_parallel -> quantize.int8_dynamic"]
    assert after["status"] == "skipped" and "torch-sharded" in after["reason"]

    # A plan whose ranks do not compute the unsharded function fails when loaded.
    folder = Path(shard["path"])
    with np.load(folder / "check.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["outputs"] = arrays["outputs"] + 1.0
    tampered = folder.parent / "tampered"
    shutil.copytree(folder, tampered)
    np.savez(tampered / "check.npz", **arrays)
    with pytest.raises(RuntimeError, match="differs from the unsharded model"):
        sharded.load(tampered, "cpu", 2)


def test_a_bert_encoder_splits_its_heads_and_mlps_over_two_ranks(kiln_dir, tmp_path):
    from transformers import BertConfig, BertModel

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, 'recipes = ["shard.tensor_parallel"]').replace(
        'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    config = with_second_target(kiln_dir, text, "cpu2", "devices", "2")
    BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         vocab_size=100)).save_pretrained(str(tmp_path / "bert"))
    checkpoint = optimize_once(config, tmp_path / "bert", "bert")
    assert checkpoint.status == "done", checkpoint.reason
    (shard,) = [v for v in all_variants(config, "bert") if v["target"] == "cpu2"]
    assert shard["status"] == "succeeded", shard.get("reason")
    layers = [f"inner.encoder.layer.{i}" for i in range(2)]
    # Two heads of each attention per rank, and half of each MLP: 4 all-reduces a pass.
    assert shard["lineage"][0]["record"]["splits"] == [
        {"columns": [f"{layer}.intermediate.dense"], "row": f"{layer}.output.dense", "width": 128}
        for layer in layers] + [
        {"columns": [f"{layer}.attention.self.{p}" for p in ("query", "key", "value")],
         "row": f"{layer}.attention.output.dense", "width": 64, "heads": 4, "kv_heads": 4, "head_dim": 16}
        for layer in layers]
    check = json.loads((Path(shard["path"]) / "variant.json").read_text())["metrics"]["checks"]["shard_check"]
    assert check["max_abs_diff"] <= check["tolerance"] and check["rows"] > 0
    assert shard["metrics"]["quality"] >= 0.9999  # cosine to the unsharded outputs


def test_a_model_over_the_memory_budget_is_streamed_from_capped_shards(kiln_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelkiln.plugins.manager import load_plugins
    from modelkiln.targets import streamed

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "shard.size_capped", "quantize.bf16 -> shard.size_capped"]')).replace(
        'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    # A second target, alike but for its 4 MiB budget (the model holds 11 MiB of weights).
    config = with_second_target(kiln_dir, text, "small", "memory_mb", "4")
    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=1000, max_position_embeddings=64,
                                 tie_word_embeddings=True)).save_pretrained(str(folder), safe_serialization=True)
    # Six variants of a causal LM, each with its decoding programs: minutes on a busy 2-core host.
    checkpoint = optimize_once(config, folder, "llama", timeout=360)
    assert checkpoint.status == "done", checkpoint.reason
    variants = {(v["target"], v["variant"]): v for v in all_variants(config, "llama")}

    capped = variants["small", "torch:shard.size_capped"]
    assert capped["status"] == "succeeded", capped.get("reason")
    record = capped["lineage"][0]["record"]
    assert record["shard_mb"] == 1 and record["memory_mb"] == 4 and record["weights_mib"] > 10
    # The whole model does not fit the budget, the streamed ones do: one is promoted there.
    half = variants["small", "torch:quantize.bf16 -> shard.size_capped"]
    promoted = {(e["model"], e["target"]): e["variant_id"] for e in promoted_entries(config)}
    assert promoted["llama", "small"] in (capped["id"], half["id"])
    assert promoted["llama", "cpu"] == variants["cpu", "torch:baseline"]["id"]
    # Streaming changes where the weights live, not what they compute.
    assert capped["metrics"]["quality"] == variants["small", "torch:baseline"]["metrics"]["quality"] == 1.0
    path = Path(capped["path"])
    index = json.loads((path / streamed.INDEX_FILE).read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 8 and set(index["weight_map"].values()) == {p.name for p in shards}
    largest_module = record["resident_weights_mib"] * 2**20
    assert all(p.stat().st_size <= 2**20 + largest_module + 4096 for p in shards)
    # Served as the daemon measured it: never more than one module's weights at once.
    served = load_plugins().runtimes["torch"].load(path, capped["file"], "cpu", 1)
    served({"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))})
    assert 0 < served.module.peak_bytes <= largest_module

    within = variants["cpu", "torch:shard.size_capped"]
    assert within["status"] == "skipped" and "no memory_mb budget" in within["reason"]
    # After quantize.bf16 the shards hold bf16 weights: half the bytes resident and read.
    assert half["status"] == "succeeded", half.get("reason")
    half_record = half["lineage"][1]["record"]
    assert half_record["dtype"] == "bfloat16"
    assert half_record["resident_weights_mib"] == pytest.approx(record["resident_weights_mib"] / 2, rel=0.01)
    assert json.loads((Path(half["path"]) / streamed.ARCHITECTURE_FILE).read_text())["dtype"] == "bfloat16"
    assert half["metrics"]["quality"] >= 0.9  # next-token agreement; bf16 may flip a near-tie


def test_a_factory_built_model_over_the_budget_is_streamed_rebuilt_by_its_factory(kiln_dir, tmp_path):
    from safetensors.torch import save_file

    from helpers import deep_mlp
    from modelkiln.plugins.manager import load_plugins
    from modelkiln.targets import streamed

    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        'recipes = ["baseline", "shard.size_capped", "prune.structured(amount=0.2) -> shard.size_capped"]')).replace(
        'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    text += '\n[architectures.deep]\nfactory = "helpers:deep_mlp"\ninput_shape = [256]\n'
    config = with_second_target(kiln_dir, text, "small", "memory_mb", "1")
    folder = tmp_path / "deep"
    folder.mkdir()
    torch.manual_seed(0)
    original = deep_mlp().eval()
    save_file(original.state_dict(), str(folder / "model.safetensors"))
    checkpoint = optimize_once(config, folder, "deep")
    assert checkpoint.status == "done", checkpoint.reason
    variants = {(v["target"], v["variant"]): v for v in all_variants(config, "deep")}

    capped = variants["small", "torch:shard.size_capped"]
    assert capped["status"] == "succeeded", capped.get("reason")
    path = Path(capped["path"])
    # Rebuilt where it is served by the factory that built it from the checkpoint.
    assert json.loads((path / streamed.ARCHITECTURE_FILE).read_text()) == {"factory": "helpers:deep_mlp"}
    assert len(list(path.glob("model-*.safetensors"))) >= 2
    promoted = {(e["model"], e["target"]): e["variant_id"] for e in promoted_entries(config)}
    assert promoted["deep", "small"] == capped["id"]
    assert capped["metrics"]["quality"] == variants["small", "torch:baseline"]["metrics"]["quality"]
    served = load_plugins().runtimes["torch"].load(path, capped["file"], "cpu", 1)
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    with torch.inference_mode():
        expected = original(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(served({"input": x})), expected, rtol=1e-5, atol=1e-6)
    assert 0 < served.module.peak_bytes <= (256 * 256 + 256) * 4
    # A step that changes the shapes leaves nothing the factory rebuilds.
    pruned = variants["small", "torch:prune.structured(amount=0.2) -> shard.size_capped"]
    assert pruned["status"] == "skipped" and "put shard.size_capped first" in pruned["reason"], pruned


def test_a_two_rank_causal_lm_splits_its_heads_and_decodes_the_same_tokens(kiln_dir, tmp_path, trained_lm):
    from modelkiln.targets.decoding import NEW_TOKENS, PROMPT_TOKENS, prompt_ids

    compiled = 'shard.tensor_parallel -> compile.inductor(mode="default")'
    text = (kiln_dir / "kiln.toml").read_text().replace(RECIPES, (
        f'recipes = ["baseline", "shard.tensor_parallel", "quantize.bf16 -> shard.tensor_parallel", \'{compiled}\']'))
    text = text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    config = with_second_target(kiln_dir, text, "cpu2", "devices", "2")
    model, english = trained_lm  # 4 query heads in 2 key/value groups of head size 32, 2 blocks
    model.save_pretrained(str(tmp_path / "llm"), safe_serialization=True)
    # Real text as the samples: the greedy check continues these prompts.
    windows = np.stack([np.frombuffer(english[i * 97:i * 97 + 64], dtype=np.uint8) for i in range(16)])
    np.savez(tmp_path / "llm" / "calibration.npz", inputs=windows.astype(np.int64))
    checkpoint = optimize_once(config, tmp_path / "llm", "llm", timeout=400)
    assert checkpoint.status == "done", checkpoint.reason
    variants = {(v["target"], v["variant"]): v for v in all_variants(config, "llm")}

    shard = variants["cpu2", "torch:shard.tensor_parallel"]
    assert shard["status"] == "succeeded", shard.get("reason")
    splits = shard["lineage"][0]["record"]["splits"]
    layers = [f"inner.model.layers.{i}" for i in range(2)]
    assert [s for s in splits if "heads" not in s] == [
        {"columns": [f"{layer}.mlp.up_proj", f"{layer}.mlp.gate_proj"], "row": f"{layer}.mlp.down_proj",
         "width": 256} for layer in layers]
    assert [s for s in splits if "heads" in s] == [
        {"columns": [f"{layer}.self_attn.{p}_proj" for p in "qkv"], "row": f"{layer}.self_attn.o_proj",
         "width": 128, "heads": 4, "kv_heads": 2, "head_dim": 32} for layer in layers]
    folder = Path(shard["path"])
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["decode"]["files"] == ["rank0/decode.pt2", "rank1/decode.pt2"], plan.get("decode")
    document = json.loads((folder / "variant.json").read_text())
    check = document["metrics"]["checks"]["shard_check"]
    assert check["max_abs_diff"] <= check["tolerance"]
    # The trained model's greedy continuations of the text, over two ranks, are the
    # unsharded model's at every position: no near-tie needed excusing.
    assert (check["greedy_prompts"], check["greedy_positions"]) == (4, 4 * 16)
    assert check["greedy_equal"] == 4 * 16 and check["greedy_ties"] == 0, check
    reference = np.load(folder / "greedy_check.npz")
    assert check["greedy_tokens"] == reference["tokens"].tolist()
    with torch.inference_mode():
        expected = model.generate(torch.from_numpy(reference["prompts"]), max_new_tokens=16, do_sample=False)
    assert expected[:, PROMPT_TOKENS:].tolist() == check["greedy_tokens"]  # as transformers generates them
    assert shard["metrics"]["quality"] == pytest.approx(1.0)  # every next token as the unsharded model's

    # Each rank's KV cache holds its own key/value head; greedy decoding over the two
    # ranks gives transformers' own tokens for the whole model.
    decode = document["metrics"]["decode"]
    expected = model.generate(torch.from_numpy(prompt_ids(256)), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_TOKENS:].tolist()
    assert decode["tokens"] == expected
    assert decode["decode_ms_per_token"] > 0
    program = torch.export.load(str(folder / "rank1" / "decode.pt2"))
    caches = [b for name, b in program.named_buffers() if "key_cache" in name or "value_cache" in name]
    assert caches and {tuple(c.shape)[1] for c in caches} == {1}  # one key/value head per rank

    # Compiled: each rank compiles its programs as plan.json says, all-reduces inside.
    fast = next(v for (target, name), v in variants.items() if target == "cpu2" and "compile.inductor" in name)
    assert fast["status"] == "succeeded", fast.get("reason")
    fast_plan = json.loads((Path(fast["path"]) / "plan.json").read_text())
    assert fast_plan["compile"]["mode"] == "default" and fast_plan["compile"]["options"]["coordinate_descent_tuning"]
    fast_check = json.loads((Path(fast["path"]) / "variant.json").read_text())["metrics"]["checks"]["shard_check"]
    assert fast_check["greedy_equal"] == 4 * 16, fast_check
    assert fast["metrics"]["decode"]["tokens"] == expected

    # In bf16 the ranks round their partial sums differently from one device: the check
    # allows twice the model's own distance from float32, measured when it was sharded.
    half = variants["cpu2", "torch:quantize.bf16 -> shard.tensor_parallel"]
    assert half["status"] == "succeeded", half.get("reason")
    rounding = json.loads((Path(half["path"]) / "plan.json").read_text())["check_rounding"]
    check = json.loads((Path(half["path"]) / "variant.json").read_text())["metrics"]["checks"]["shard_check"]
    assert rounding > 0 and check["max_abs_diff"] <= check["tolerance"] <= 2 * rounding + 0.01, (rounding, check)
    assert check["greedy_equal"] + check["greedy_ties"] >= 1 and check["greedy_positions"] == 4 * 16
    assert plan["check_rounding"] == 0.0

    # A sharded variant whose greedy tokens part from the unsharded model's where that
    # model was sure of its choice fails its load.
    from modelkiln.targets.sharded import load

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    wrong = dict(np.load(broken / "greedy_check.npz"))
    wrong["tokens"] = (wrong["tokens"] + 1) % 256
    wrong["margins"] = np.full_like(wrong["margins"], 10.0)
    np.savez(broken / "greedy_check.npz", **wrong)
    with pytest.raises(RuntimeError, match="greedy decoding over 2 ranks chose token"):
        load(broken, "cpu", 2)
