"""Causal language models: prefill and per-token decode through a static KV cache."""

import json
import subprocess
import sys
import zipfile
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
    assert "4: " in out and "tok/s" in out and "prefill 64: " in out
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


def check_decoding(config, tmp_path, device, with_text=False, with_train=False):
    """A tiny Llama through the pipeline: every variant has decode figures, and the
    baseline's greedy tokens are those of transformers' own generate on ``device``.
    ``with_text``: the checkpoint ships its tokenizer and ``calibration.jsonl``;
    ``with_train``: and ``train.jsonl`` (other sentences of the same words)."""
    from modelkiln.targets.decoding import NEW_TOKENS, PROMPT_TOKENS, prompt_ids
    from modelkiln.targets.torchrt import TorchRuntime

    model = tiny_llama()
    folder = tmp_path / "llm"
    model.save_pretrained(str(folder), safe_serialization=True)
    if with_text:
        word_tokenizer(folder)
        lines = [json.dumps({"text": " ".join(TEXT.split()[i:] + TEXT.split()[:i])}) for i in range(40)]
        (folder / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    if with_train:
        words = TEXT.split()[::-1]
        lines = [json.dumps({"text": " ".join(words[i:] + words[:i])}) for i in range(len(words))]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
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
        # As a server runs it: the target's decode batch sizes (the tests' config: [1, 4]),
        # each sequence its own KV cache, and prefill of longer prompts ([64]).
        assert [row["batch_size"] for row in decode["batches"]] == [1, 4]
        assert all(row["tokens_per_s"] > 0 and row["decode_p95_ms"] >= row["decode_ms_per_token"]
                   for row in decode["batches"])
        assert [row["tokens"] for row in decode["prefill"]] == [64] and decode["prefill"][0]["prefill_ms"] > 0
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


def test_decoding_programs_for_each_batch_share_the_variants_one_copy_of_the_weights(tmp_path):
    """One program per decode batch size and one for long prompts, none storing the
    weights or its empty KV cache: loaded, they read the same tensors, each sequence of a
    batch decodes as it would alone, and the prompt lengths stop at the model's context."""
    from modelkiln.targets import decoding, derived, hf_folder

    model = tiny_llama()
    weights, stored = hf_folder.save(model, tmp_path)
    entry = decoding.save_decoders(model, tmp_path, lambda p, prefix: derived.strip(
        p, stored, derived.kernel_sources(model, prefix)), batch_sizes=[1, 4], prefill_tokens=[100, 512])
    assert entry["batches"] == {"4": {"file": "decode_b4.pt2", "program_weights": entry["batches"]["4"][
        "program_weights"]}}
    assert entry["prefill"]["tokens"] == [100, 128] and entry["prefill"]["max_cache_len"] == 129
    for file in ("decode.pt2", "decode_b4.pt2", "prefill.pt2"):
        with zipfile.ZipFile(tmp_path / file) as archive:  # the graph, but no weights nor caches
            assert sum(i.file_size for i in archive.infolist() if "/data/" in i.filename) < 64 * 1024, file
    shared: dict = {}
    programs = {}
    for batch, source in ((1, entry), (4, entry["batches"]["4"]), (0, entry["prefill"])):
        program = torch.export.load(str(tmp_path / source["file"]))
        derived.fill(program, source["program_weights"], stored, "cpu", shared)
        programs[batch] = program.module()
    embeddings = [dict(p.named_parameters())["model.model.embed_tokens.weight"] for p in programs.values()]
    assert len({e.data_ptr() for e in embeddings}) == 1
    caches = [b for p in programs.values() for n, b in p.named_buffers() if "key_cache" in n]
    assert len({c.data_ptr() for c in caches}) == len(caches) and not any(c.count_nonzero() for c in caches)
    ids = torch.from_numpy(decoding.prompt_ids(256, batch=4))
    with torch.inference_mode():
        together = programs[4](input_ids=ids, cache_position=torch.arange(32))
        alone = programs[1](input_ids=ids[2:3], cache_position=torch.arange(32))
        assert torch.allclose(together[2:3], alone, atol=1e-5) and torch.allclose(together, model(ids).logits,
                                                                                   atol=1e-4)
        long = torch.from_numpy(decoding.prompt_ids(256, tokens=128))
        assert torch.allclose(programs[0](input_ids=long, cache_position=torch.arange(128)), model(long).logits,
                              atol=1e-4)
    figures = decoding.time_decoding(programs[1], 256, "cpu", rounds=1, batched={4: programs[4]},
                                     prefill=(programs[0], [100, 128]))
    assert [row["batch_size"] for row in figures["batches"]] == [1, 4]
    assert [row["tokens"] for row in figures["prefill"]] == [100, 128]
    assert decoding.summary(figures).startswith("4: ") and "prefill 128: " in decoding.summary(figures)
