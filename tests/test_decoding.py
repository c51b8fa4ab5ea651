"""Causal language models: prefill and per-token decode through a static KV cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import optimize_once
from test_pipeline import all_variants

RECIPES = 'recipes = ["baseline", "quantize.int8_dynamic"]'


def test_a_causal_lm_is_measured_by_prefill_and_decode(kiln_dir, tmp_path):
    from modelkiln.config import load_config

    from test_llm_folder import check_llm_folders

    text = (kiln_dir / "kiln.toml").read_text().replace(
        RECIPES, 'recipes = ["baseline", "quantize.bf16", "quantize.weight_only"]').replace(
        'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    variants = check_decoding(config, tmp_path, "cpu", with_text=True)
    # Each variant is also the Hugging Face folder LLM servers load (int4: compressed-tensors).
    check_llm_folders(config, variants)
    out = subprocess.run([sys.executable, "-m", "modelkiln", "variants", "llm", "--config", str(kiln_dir / "kiln.toml")],
                         capture_output=True, text=True, check=True).stdout
    assert "ms/token" in out and "prefill of a 32-token prompt" in out
    # The quality gate of a causal LM with text of its own: the original's perplexity on that
    # text (packed into windows of real tokens) over the variant's; agreement and KL beside.
    for variant in all_variants(config, "llm"):
        metrics = variant["metrics"]
        assert metrics["quality_metric"] == "perplexity_ratio" and metrics["baseline_quality"] == 1.0
        checks = json.loads((Path(variant["path"]) / "variant.json").read_text())["metrics"]["checks"]
        kl = checks["next_token_kl"]
        assert 1 < checks["baseline_perplexity"] < 1000
        assert metrics["quality"] == pytest.approx(checks["baseline_perplexity"] / checks["perplexity"])
        if variant["recipe"] == "baseline":
            assert metrics["quality"] == 1.0 and kl < 1e-6 and checks["next_token_top1"] == 1.0
        elif variant["recipe"] == "quantize.bf16":  # a few near-ties may flip, the distributions stay close
            assert checks["next_token_top1"] >= 0.9 and 0 < kl < 0.05, (checks["next_token_top1"], kl)
            assert metrics["quality"] >= 0.99


def test_the_llm_gate_rejects_a_variant_whose_next_tokens_drift():
    import numpy as np

    from modelkiln.config import PolicyConfig
    from modelkiln.policy import within_tolerance
    from modelkiln.targets.quality import NEXT_TOKEN_TOP1, choose_metric, next_token_kl, score

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 16, 50)).astype(np.float32)
    assert choose_metric(reference, None, causal_lm=True) == NEXT_TOKEN_TOP1
    close = reference + rng.normal(scale=1e-3, size=reference.shape).astype(np.float32)
    drifted = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    policy = PolicyConfig()
    for outputs, passes in ((close, True), (drifted, False)):
        quality = score(NEXT_TOKEN_TOP1, outputs, reference, None)
        candidate = {"metrics": {"quality": quality, "baseline_quality": 1.0}}
        assert within_tolerance(candidate, policy) is passes, quality
    assert next_token_kl(close, reference) < 1e-4 < next_token_kl(drifted, reference)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


def word_tokenizer(folder: Path, vocab_size: int = 256):
    """A word-level tokenizer of at most ``vocab_size`` tokens, saved into ``folder``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.strip(".,").lower() for w in TEXT.split()})[: vocab_size - 2]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(str(folder))


TEXT = ("the daemon watches a folder of models and every new checkpoint is quantized pruned and measured "
        "on each target before the fastest variant that keeps its quality is promoted for serving code")


def check_decoding(config, tmp_path, device, with_text=False):
    """A tiny Llama through the pipeline: every variant has decode figures, and the
    baseline's greedy tokens are those of transformers' own generate on ``device``.
    ``with_text``: the checkpoint ships its tokenizer and ``calibration.jsonl``."""
    from modelkiln.targets.decoding import NEW_TOKENS, PROMPT_TOKENS, prompt_ids
    from modelkiln.targets.torchrt import TorchRuntime

    model = tiny_llama()
    folder = tmp_path / "llm"
    model.save_pretrained(str(folder), safe_serialization=True)
    if with_text:
        word_tokenizer(folder)
        lines = [json.dumps({"text": " ".join(TEXT.split()[i:] + TEXT.split()[:i])}) for i in range(40)]
        (folder / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    checkpoint = optimize_once(config, folder, "llm", timeout=300)
    assert checkpoint.status == "done", checkpoint.reason
    if with_text:  # the text, end to end, in windows of the sample length
        assert checkpoint.info["sample_source"] == "calibration.jsonl"
        assert checkpoint.info["inputs"][0]["shape"] == [-1, 128]
    variants = all_variants(config, "llm")
    assert {v["status"] for v in variants} == {"succeeded"}, {v["variant"]: v.get("reason") for v in variants}
    for variant in variants:
        decode = json.loads((Path(variant["path"]) / "variant.json").read_text())["metrics"]["decode"]
        assert (decode["prompt_tokens"], decode["new_tokens"]) == (PROMPT_TOKENS, NEW_TOKENS)
        assert decode["prefill_ms"] > 0 and 0 < decode["decode_ms_per_token"] <= decode["decode_p95_ms"]
        assert variant["metrics"]["decode"] == decode  # the catalogue has them too (policy objectives)
        if variant["recipe"] == "baseline":
            serving = json.loads((Path(variant["path"]) / "serving.json").read_text())
            assert serving["decode"]["fused_linears"] == 2 * 3  # q/k/v and gate/up of each block
            prompt = torch.from_numpy(prompt_ids(256)).to(device)
            expected = model.to(device).generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                 do_sample=False)[0, PROMPT_TOKENS:].tolist()
            assert decode["tokens"] == expected
            # The forward program scores a prompt of any length, as the original does.
            meta = json.loads((Path(variant["path"]) / "variant.json").read_text())
            assert meta["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
            # Its weights are the folder's: the runtime's loader puts them into the program.
            program = TorchRuntime().load(Path(variant["path"]), meta["file"], device, 1).module
            for length in (5, 23):
                with torch.inference_mode():
                    got, want = program(prompt[:, :length]), model(prompt[:, :length]).logits
                assert got.shape == want.shape and torch.allclose(got.float(), want.float(), atol=1e-3, rtol=1e-3)
    return variants
