"""Weight files stored once across an artifacts root's variants (targets/blobs.py,
Layout's blob store), and what each job cost the host (pipeline/footprint.py)."""

import errno
import json
import os
import re
from pathlib import Path

import torch

from helpers import optimize_once
from test_decoding import tiny_llama
from test_pipeline import all_variants


def _shards(folder: Path) -> list[Path]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return [folder / name for name in sorted(set(index["weight_map"].values()))]


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.inference_mode():
        return AutoModelForCausalLM.from_pretrained(str(folder)).eval()(ids).logits


def test_identical_shards_are_one_file_until_their_last_variant_goes(tmp_path):
    from modelkiln.daemon.layout import Layout
    from modelkiln.pipeline.footprint import DiskPeak
    from modelkiln.targets import hf_folder

    layout = Layout(tmp_path / "artifacts")
    model = tiny_llama().to(torch.bfloat16)
    first, second, other = (layout.root / "llm" / "h" / "cpu" / name for name in ("a", "b", "c"))
    for folder in (first, second, other):
        folder.mkdir(parents=True)
    described, _ = hf_folder.save(model, first, shard_bytes=50_000, blobs=layout.blobs)
    assert "shared_files" not in described  # the first writes them, and stores them
    disk = DiskPeak([second]).start()
    described, _ = hf_folder.save(model, second, shard_bytes=50_000, blobs=layout.blobs)
    new_bytes = disk.stop()
    shards = _shards(second)
    assert len(shards) > 3 and described["shared_files"] == [s.name for s in shards]
    for mine, theirs in zip(shards, _shards(first)):
        assert mine.samefile(theirs) and mine.stat().st_nlink == 3  # two variants and the store
    weight_bytes = sum(s.stat().st_size for s in shards)
    assert new_bytes < 0.1 * weight_bytes  # the config files, not the weights
    # Other weights are other blobs.
    hf_folder.save(tiny_llama(), other, blobs=layout.blobs)
    assert len(os.listdir(layout.blobs)) == len(shards) + 1

    ids = torch.randint(0, 256, (2, 9))
    model.save_pretrained(str(tmp_path / "plain"))  # what transformers itself writes answers the same
    expected = _logits(tmp_path / "plain", ids)
    for folder in (first, second):
        assert torch.equal(_logits(folder, ids), expected)
    layout.remove(first)
    assert len(os.listdir(layout.blobs)) == len(shards) + 1 and all(s.stat().st_nlink == 2 for s in shards)
    assert torch.equal(_logits(second, ids), expected)
    layout.remove(second)  # the last user of those shards
    assert len(os.listdir(layout.blobs)) == 1
    layout.remove(other)
    assert os.listdir(layout.blobs) == []


def test_where_links_are_impossible_the_file_is_written_and_the_log_says_so_once(tmp_path, monkeypatch, caplog):
    from modelkiln.targets import blobs, hf_folder

    def no_link(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(blobs.os, "link", no_link)
    monkeypatch.setattr(blobs, "_warned", False)
    model = tiny_llama()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        described, _ = hf_folder.save(model, tmp_path / name, blobs=tmp_path / ".blobs")
        assert "shared_files" not in described
    assert not _shards(tmp_path / "a")[0].samefile(_shards(tmp_path / "b")[0])
    assert len([r for r in caplog.records if "cannot hard-link" in r.getMessage()]) == 1
    with torch.inference_mode():
        torch.testing.assert_close(_logits(tmp_path / "b", torch.tensor([[1, 2, 3]])),
                                   model(torch.tensor([[1, 2, 3]])).logits)


def test_content_stored_by_another_job_meanwhile_leaves_one_copy(tmp_path):
    from modelkiln.targets import blobs

    store = tmp_path / ".blobs"

    def write(path):
        path.write_bytes(b"weights")

    assert not blobs.place(store, "k", tmp_path / "a", write)  # new content: written, then stored
    assert (store / "k").samefile(tmp_path / "a")
    assert blobs.place(store, "k", tmp_path / "b", write)  # stored: linked, nothing written
    assert (store / "k").stat().st_nlink == 3

    def write_while_another_job_stores_it(path):
        write(path)
        (tmp_path / "theirs").write_bytes(b"weights")
        os.link(tmp_path / "theirs", store / "late")

    assert not blobs.place(store, "late", tmp_path / "c", write_while_another_job_stores_it)
    assert (tmp_path / "c").samefile(tmp_path / "theirs") and (tmp_path / "c").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == [".blobs", "a", "b", "c", "theirs"]


def test_two_identical_variants_of_a_bf16_llm_share_their_shards_and_record_their_cost(kiln_dir, tmp_path):
    """Through the daemon: a bf16 checkpoint's baseline and quantize.bf16 hold the same
    weights, stored once; each job records its worker's peak memory and the bytes it wrote."""
    from modelkiln.config import load_config
    from modelkiln.daemon.layout import Layout

    text = (kiln_dir / "kiln.toml").read_text()
    text = text.replace('recipes = ["baseline", "quantize.int8_dynamic"]', 'recipes = ["baseline", "quantize.bf16"]')
    text = text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
    # One worker (the default): the second job finds what the first stored.
    assert re.search(r"(?m)^count = 1$", text)
    text = text.replace("decode_batch_sizes = [1, 4]", "decode_batch_sizes = [1]").replace(
        "prefill_tokens = [64]", "prefill_tokens = []")
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    model = tiny_llama().to(torch.bfloat16)
    model.model.layers = model.model.layers[:1]  # one block: half the export time
    model.config.num_hidden_layers = 1
    folder = tmp_path / "llm"
    model.save_pretrained(str(folder), safe_serialization=True)
    checkpoint = optimize_once(config, folder, "llm", timeout=300)
    assert checkpoint.status == "done", checkpoint.reason
    variants = {v["recipe"]: v for v in all_variants(config, "llm")}
    assert {v["status"] for v in variants.values()} == {"succeeded"}, {r: v["reason"] for r, v in variants.items()}
    baseline, half = (Path(variants[r]["path"]) for r in ("baseline", "quantize.bf16"))
    shards = list(zip(_shards(baseline), _shards(half)))
    assert shards and all(a.samefile(b) for a, b in shards)
    weight_bytes = sum(a.stat().st_size for a, _ in shards)
    ids = torch.randint(0, 256, (2, 9))
    expected = _logits(folder, ids)  # the checkpoint's own answers
    for path in (baseline, half):
        assert torch.equal(_logits(path, ids), expected)

    # torch alone, loaded, is more than the tiny model: the figure is the whole process's.
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    costs, shared = {}, {}
    for recipe, variant in variants.items():
        document = json.loads((Path(variant["path"]) / "variant.json").read_text())
        assert variant["timings"]["build"] == document["timings"]["build"]  # the catalogue has them too
        build, measure = document["timings"]["build"], document["timings"]["measure"]
        for phase in (build, measure):
            assert max(model_bytes, 100 * 2**20) < phase["peak_host_bytes"] < 64 * 2**30, phase
        assert measure["new_disk_bytes"] < weight_bytes  # a measurement writes no weights
        costs[recipe] = build["new_disk_bytes"]
        shared[recipe] = document["weights"].get("shared_files")
    # The first build wrote the weights; the second linked them and wrote only its own
    # files (config, programs).
    (linked,) = [recipe for recipe, files in shared.items() if files]
    wrote = next(recipe for recipe in costs if recipe != linked)
    assert shared[linked] == [a.name for a, _ in shards]

    def written(recipe: str, weights: bool) -> int:  # as du counts it; variant.json comes after the build
        names = {"variant.json", *([] if weights else [a.name for a, _ in shards])}
        return sum(p.stat().st_blocks * 512 for p in Path(variants[recipe]["path"]).iterdir() if p.name not in names)

    assert costs[wrote] >= written(wrote, weights=True), (costs, weight_bytes)
    assert written(linked, weights=False) <= costs[linked] < written(linked, weights=False) + weight_bytes / 2, \
        (costs, weight_bytes)

    from click.testing import CliRunner

    from modelkiln.cli import main

    table = CliRunner().invoke(main, ["variants", "llm", "--config", str(kiln_dir / "kiln.toml")]).output
    assert "build: memory, disk" in table and "MiB, +" in table

    layout = Layout(config.artifacts_path)
    layout.remove(baseline)
    assert all(b.stat().st_nlink == 2 for _, b in shards)
    assert torch.equal(_logits(half, ids), expected)
    layout.remove(half)
    assert not any(layout.blobs.iterdir())


def test_the_daemons_clean_up_removes_blobs_no_variant_links(config):
    """A variant folder removed by hand leaves its blobs to the next clean-up."""
    from modelkiln.daemon.service import Daemon

    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        store = daemon.layout.blobs
        variant = config.artifacts_path / "m" / "abc" / "cpu" / "torch--baseline"
        variant.mkdir(parents=True)
        store.mkdir(exist_ok=True)
        for key in ("used", "unused"):
            (store / key).write_bytes(b"weights")
        os.link(store / "used", variant / "model-00001-of-00001.safetensors")
        daemon.inbox.put(("cleanup", None))
        daemon.run_once(0)
        assert sorted(os.listdir(store)) == ["used"]
    finally:
        daemon.stop(5)
