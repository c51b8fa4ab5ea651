"""A Llama-2-7B-shaped checkpoint dropped into `kiln serve` on one GPU, default GPU recipes.

Issue 33's item 5, end to end, as an LLM host would run it:

1. A Llama-2-7B-shaped causal LM (6.74 B parameters with ``--layers 32``; random
   weights, created on the target's device with a fixed seed, in bf16) is saved with
   ``save_pretrained`` as sharded safetensors, with a byte-level BPE tokenizer trained
   here on the standard library's sources (vocab 32000, the config's) and text for the
   quality gate: ``calibration.jsonl`` (training files' paragraphs) and ``eval.jsonl``
   (held-out files'), as ``bench_llm_quality.py`` makes them. It is written under
   ``models/.staging/`` of a fresh ``kiln init`` folder and renamed into
   ``models/llm`` once ``kiln serve`` runs (README, "Dropping a checkpoint").
2. The config is ``kiln init``'s, untouched but for: ``[targets.cpu]`` replaced by
   ``[targets.gpu]`` with ``device = "cuda"``, ``runtimes = ["torch"]`` and no recipes
   line (so ``GPU_RECIPES`` apply); ``http.address`` on a free port (no clash with
   another daemon on the host). The quality gate and the objective are the defaults.
3. ``kiln serve`` runs as a subprocess. Every ``--every`` seconds: the disk use of the
   artifacts folder (``du``-like, a hard-linked file counted once), the free disk, and
   the host memory of the daemon's process tree from /proc (each process's VmHWM, and
   the tree's summed Pss); every few samples ``kiln status --json``, until the
   checkpoint is done and no job is open, or ``--timeout`` after the drop. Then the
   daemon is stopped.
4. Tables: every job's elapsed time and its phases' peak RSS (``variant.json``); every
   variant's status, decode ms/token at batch 1/8/32, prefill at 512/2048 tokens, batch 1
   against its own bandwidth floor (the bytes of its safetensors over the copy bandwidth
   ``bench_gpu.bandwidth_gb_s`` measured before the daemon started), size, quality, and
   which is promoted; then ``kiln variants`` as it prints.
5. The peer: transformers' ``generate`` with a static cache and its compile
   (``bench_llm.generate_per_token``) on the same seeded bf16 model, after the daemon
   stopped. Then every variant's folder (the promoted one through its ``promoted/``
   link) is loaded with ``AutoModelForCausalLM.from_pretrained`` alone
   (compressed-tensors where quantized) on the device, and its next-token logits on
   seeded prompts are compared with the program modelkiln measured
   (``TorchRuntime().load``): perplexity within the gate's 1 %, top-1 agreement and KL
   beside it.
6. The acceptance checks of issue 33 as PASS / FAIL lines.

Everything printed also goes to ``$OUT/bench_llm_serve.txt`` when ``$OUT`` is set, with
the daemon's log beside it (``serve.log``).

``--tiny`` (2 layers, hidden 256, vocab 2048) runs the same path in minutes; with
``--device cpu`` the target is ``[targets.cpu]`` with the GPU recipes listed (a cpu
device without a recipes line gets the CPU's), and what needs a GPU (the floor, the
peer) is printed as "n/a on cpu". At that size the artifacts' fixed costs (program
graphs, reference outputs) outweigh the weights, so the disk check is for the 7B.

Disk: the daemon snapshots the drop (a copy under ``artifacts/``), so the disk holds the
drop, the snapshot and the variants; ``--free-drop`` removes the drop once the catalogue
has the checkpoint, as a host short of disk would. ``--folders promoted`` loads only the
promoted folder with transformers, where time is short.

Run on the GPU machine with modelkiln and its ``llm`` extra installed; it outlasts one
10-minute command there, so start it in a session of its own and collect ``$OUT`` later:
  OUT=/tmp/llm_serve setsid nohup python3 bench/bench_llm_serve.py --free-drop > /tmp/llm_serve.log 2>&1 &
Without a GPU: PYTHONPATH=. python3 bench/bench_llm_serve.py --tiny --device cpu --timeout 600
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_llm_quality import stdlib_files
from common import Serve, kiln_folder, print_table

MODEL = "llm"
SEED = 0
# Issue 33's acceptance bounds.
JOB_MINUTES = 25
DISK_MARGIN = 0.10
HOST_MEMORY_FACTOR = 1.5
FLOOR_FACTOR = 1.25
PEER_FACTOR = 1.4
DECODE_BATCHES = (1, 8, 32)
PREFILL_TOKENS = (512, 2048)
# Paragraphs of held-out files as eval text, of training files as calibration text.
EVAL_PARAGRAPHS, CALIBRATION_PARAGRAPHS = 150, 256
# Seeded prompts the folders' logits are compared on.
CHECK_ROWS, CHECK_TOKENS = 8, 24
STATUS_SECONDS = 5.0
PROGRESS_SECONDS = 60.0


class Tee:
    """stdout, and a copy in a file."""

    def __init__(self, stream, path: Path):
        self.stream = stream
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return False


def lm_config(args):
    from transformers import LlamaConfig

    from bench_llm import llama_7b_config

    if args.tiny:
        # Positions as the 7B's, so that prefill at 2,048 tokens is measured too.
        # Widths int4's groups of 128 divide, as the 7B's do.
        return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=args.layers or 2,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=2048,
                           max_position_embeddings=4096)
    config = llama_7b_config()
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    return config


def build_model(config, device: str):
    """The seeded model in bf16, made on ``device`` (never in float32 first)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


def write_checkpoint(staged: Path, config, device: str, tiny: bool) -> int:
    """The checkpoint's folder; returns its parameter count."""
    import torch

    started = time.time()
    model = build_model(config, device)
    params = sum(p.numel() for p in model.parameters())
    # Small shards for the tiny model too, so that the index path is the one exercised.
    model.save_pretrained(str(staged), max_shard_size="1MB" if tiny else "5GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    train_files, held_out = stdlib_files()
    train_text = [p.read_text(errors="replace") for p in train_files]
    tokenizer = train_tokenizer(train_text, config.vocab_size)
    tokenizer.save_pretrained(str(staged))
    held_text = [p.read_text(errors="replace") for p in held_out]
    for name, texts, count in (("eval.jsonl", held_text, EVAL_PARAGRAPHS),
                               ("calibration.jsonl", train_text, CALIBRATION_PARAGRAPHS)):
        paragraphs = [para for text in texts for para in text.split("\n\n") if len(para.split()) > 8]
        (staged / name).write_text("\n".join(json.dumps({"text": para}) for para in paragraphs[:count]) + "\n")
    shards = sorted(p.name for p in staged.glob("*.safetensors"))
    print(f"checkpoint: {_count(params)} parameters, bf16, {len(shards)} safetensors shards, tokenizer of "
          f"{len(tokenizer)} tokens (config: {config.vocab_size}), {folder_bytes(staged) / 2**30:.2f} GiB, "
          f"written in {time.time() - started:.0f} s", flush=True)
    return params


def write_config(device: str) -> tuple[Path, str, list[str]]:
    """A `kiln init` folder whose only target is ``device``'s; its name and what changed."""
    from modelkiln.config import GPU_RECIPES

    cuda = device.startswith("cuda")
    name = "gpu" if cuda else "cpu"
    folder = kiln_folder()  # its http.address is 127.0.0.1:0
    table = f'[targets.{name}]\ndevice = "{device}"\nruntimes = ["torch"]\n'
    changes = ['http.address = "127.0.0.1:0": a free port, no clash with another daemon on this host',
               "[targets.cpu] removed: a 7B on the host's CPU is not what is measured",
               f'[targets.{name}] added: device = "{device}", runtimes = ["torch"]']
    if cuda:
        changes[-1] += ", no recipes line (GPU_RECIPES apply)"
    else:
        # A cpu device without recipes gets the CPU's set; the GPU's path is what is validated.
        table += "recipes = [" + ", ".join(f'"{r}"' for r in GPU_RECIPES) + "]\n"
        changes[-1] += ", recipes = GPU_RECIPES listed (a cpu device would get the CPU's)"
    file = folder / "kiln.toml"
    text = file.read_text()
    section = re.search(r"(?ms)^\[targets\.cpu\]\n.*?(?=^\[policy\])", text)
    assert section, "kiln init's [targets.cpu] table"
    file.write_text(text[:section.start()] + table + "\n" + text[section.end():])
    return folder, name, changes


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file() and not p.is_symlink())


def disk_use(root: Path) -> int:
    """Bytes ``root``'s files take on disk, a file with several hard links counted once."""
    from modelkiln.pipeline.footprint import allocated_files

    return sum(allocated_files([root]).values())


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    found = {}
    try:
        with open(path) as file:
            for line in file:
                key, _, value = line.partition(":")
                if key in names:
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


class Footprint:
    """Peaks of the artifacts folder's disk use and of the daemon's process tree's host
    memory, sampled. A process's VmHWM is its own peak between samples too; the tree's
    summed Pss counts the pages forked processes share once."""

    def __init__(self, artifacts: Path, root_pid: int):
        self.artifacts = artifacts
        self.root_pid = root_pid
        self.peak_disk = 0
        self.least_free = None
        self.peak_tree_pss = 0
        self.peak_tree_rss = 0
        self.hwm: dict[int, tuple[int, str]] = {}  # pid -> (VmHWM, command line)
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1
        if self.artifacts.is_dir():
            self.peak_disk = max(self.peak_disk, disk_use(self.artifacts))
            free = shutil.disk_usage(self.artifacts).free
            self.least_free = free if self.least_free is None else min(self.least_free, free)
        pss = rss = 0
        for pid in _process_tree(self.root_pid):
            status = _kib_fields(f"/proc/{pid}/status", ("VmHWM", "VmRSS"))
            rss += status.get("VmRSS", 0)
            pss += _kib_fields(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss", status.get("VmRSS", 0))
            if "VmHWM" in status and status["VmHWM"] > self.hwm.get(pid, (0, ""))[0]:
                self.hwm[pid] = (status["VmHWM"], self.hwm.get(pid, (0, ""))[1] or _command(pid))
        self.peak_tree_pss = max(self.peak_tree_pss, pss)
        self.peak_tree_rss = max(self.peak_tree_rss, rss)

    def worker_peak(self) -> tuple[int, str]:
        """The largest VmHWM of a process under the daemon, and its command line."""
        workers = [v for pid, v in self.hwm.items() if pid != self.root_pid]
        return max(workers, default=(0, ""))


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def kiln(*args: str, config: Path) -> str:
    """A `kiln` command's output (the modelkiln this process imports: same PYTHONPATH)."""
    done = subprocess.run([sys.executable, "-m", "modelkiln", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"kiln {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def wait_for_jobs(serve: Serve, footprint: Footprint, config_file: Path, drop: float, timeout: float,
                  every: float, free: Path | None) -> tuple[bool, str]:
    """Sample until the checkpoint is done and no job is open, the daemon dies, or the
    timeout; whether every job ended, and the last status line. ``free``: the dropped
    folder, removed once the catalogue has the checkpoint (its snapshot is whole then)."""
    next_status = next_progress = time.time()
    line = "no status yet"
    while True:
        footprint.sample()
        now = time.time()
        if serve.process.poll() is not None:
            return False, f"kiln serve exited {serve.process.returncode}; see {serve.folder / 'serve.log'}"
        if now >= next_status:
            next_status = now + STATUS_SECONDS
            try:
                status = json.loads(kiln("status", "--json", config=config_file))
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                status = None
                line = f"kiln status: {exc}"
            if status is not None:
                ours = [c for c in status["checkpoints"] if c["model"] == MODEL]
                if ours and free is not None and free.exists():
                    shutil.rmtree(free)
                    print(f"  {now - drop:5.0f} s: removed the drop {free} (--free-drop)", flush=True)
                state = ours[-1]["status"] if ours else "not ingested yet"
                jobs = status["jobs"]
                running = ", ".join(f"{j['variant'] or j['kind']} ({(j['progress'] or {}).get('phase', '')})"
                                    for j in status["running"])
                line = (f"checkpoint {state}; jobs {json.dumps(jobs, sort_keys=True)}"
                        + (f"; running {running}" if running else ""))
                if ours and state != "ingested" and state != "ready" and not jobs.get("pending") \
                        and not jobs.get("running"):
                    return True, line
        if now >= next_progress:
            next_progress = now + PROGRESS_SECONDS
            print(f"  {now - drop:5.0f} s: {line}; artifacts peak {footprint.peak_disk / 2**30:.2f} GiB, "
                  f"daemon tree peak Pss {footprint.peak_tree_pss / 2**30:.2f} GiB", flush=True)
        if now - drop > timeout:
            return False, f"--timeout {timeout:.0f} s passed: {line}"
        time.sleep(every)


def job_rows(config, variants: list[dict], drop: float) -> tuple[list[list], float | None, bool]:
    """Each job of the checkpoint: kind, variant, state, elapsed, the phases' peak RSS;
    the seconds from the drop to the last job's end; whether every job ended."""
    from modelkiln.sizes import format_size
    from modelkiln.store import queries, views
    from modelkiln.store.db import open_store
    from modelkiln.store.states import TERMINAL_JOB_STATES

    documents = {v["variant"]: _document(v) for v in variants}
    rows, last, ended = [], None, True
    with open_store(config).session() as session:
        checkpoints = queries.checkpoints(session, MODEL)
        jobs = queries.jobs_of(session, checkpoints[-1].id) if checkpoints else []
        for job in jobs:
            label = views.variant_label(job.variant) if job.variant is not None else ""
            ended = ended and job.state in TERMINAL_JOB_STATES
            elapsed = (job.finished_at - job.started_at).total_seconds() \
                if job.started_at and job.finished_at else None
            if job.finished_at is not None:
                last = max(last or 0.0, _utc_seconds(job.finished_at) - drop)
            peaks = documents.get(label, {}).get("peak_rss_bytes") or {}
            rows.append([job.id, job.kind, label, job.state, "" if elapsed is None else f"{elapsed:.0f}",
                         *(format_size(peaks[p]) if peaks.get(p) else "" for p in ("build", "measure")),
                         (job.reason or "")[:70]])
    return rows, last, ended and bool(rows)


def _utc_seconds(moment) -> float:
    """Seconds since the epoch of a catalogue time (UTC, stored without its zone)."""
    from datetime import timezone

    return moment.replace(tzinfo=timezone.utc).timestamp()


def _document(variant: dict) -> dict:
    path = Path(variant["path"] or "") / "variant.json"
    try:
        return json.loads(path.read_text()) if variant["path"] and path.is_file() else {}
    except ValueError:
        return {}


def decode_figures(variant: dict) -> tuple[dict, dict]:
    """(ms per step by batch size, prefill ms by prompt length) of a variant."""
    decode = (variant.get("metrics") or {}).get("decode") or {}
    batches = {row["batch_size"]: row["decode_ms_per_token"] for row in decode.get("batches") or []}
    if "decode_ms_per_token" in decode:
        batches.setdefault(1, decode["decode_ms_per_token"])
    prefill = {row["tokens"]: row["prefill_ms"] for row in decode.get("prefill") or []}
    return batches, prefill


def is_16_bit(variant: dict) -> bool:
    return not any(step in variant["recipe"] for step in ("fp8", "weight_only", "int8", "int4"))


def weight_files(variant: dict) -> list[Path]:
    return sorted(Path(variant["path"]).glob("*.safetensors")) if variant.get("path") else []


def own_weight_bytes(variants: list[dict], snapshot: Path | None) -> int:
    """Bytes of the variants' weight files, a file several variants link counted once, and
    one linked from the checkpoint's snapshot not at all."""
    shared = set()
    if snapshot is not None and snapshot.is_dir():
        shared = {(p.stat().st_dev, p.stat().st_ino) for p in snapshot.rglob("*") if p.is_file()}
    total = 0
    for variant in variants:
        for file in weight_files(variant):
            info = file.stat()
            if (info.st_dev, info.st_ino) not in shared:
                shared.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def ms(value) -> str:
    return "" if value is None else f"{value:.2f}"


def variant_rows(variants: list[dict], promoted: set[int], bandwidth: float | None) -> list[list]:
    from modelkiln.sizes import format_size

    rows = []
    for v in variants:
        m = v.get("metrics") or {}
        batches, prefill = decode_figures(v)
        weights = sum(f.stat().st_size for f in weight_files(v))
        floor = weights / (bandwidth * 1e9) * 1000 if bandwidth and weights else None
        quality = f"{m['quality']:.4f} {m['quality_metric']}" if m.get("quality") is not None else ""
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"],
                     *(ms(batches.get(b)) for b in DECODE_BATCHES), *(ms(prefill.get(t)) for t in PREFILL_TOKENS),
                     f"{batches[1] / floor:.2f}x" if floor and batches.get(1) else
                     ("n/a on cpu" if not bandwidth and batches else ""),
                     format_size(m["size_bytes"]) if m.get("size_bytes") else "",
                     format_size(weights) if weights else "", quality, (v.get("reason") or "")[:70]])
    return rows


def time_peer(config, device: str) -> float:
    """transformers' generate, static cache + its compile, on the seeded bf16 model: ms/token."""
    import torch

    from bench_llm import generate_per_token
    from modelkiln.targets.decoding import prompt_ids

    model = build_model(config, device)
    prompt = torch.from_numpy(prompt_ids(config.vocab_size)).to(device)
    with torch.no_grad():
        per_token, _ = generate_per_token(model, prompt, cache_implementation="static")
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return per_token


def check_folder(folder: Path, file: str, device: str, tolerance: float) -> tuple[bool, str]:
    """The folder loaded by transformers alone against the program modelkiln measured, on
    the same seeded prompts: (perplexities within ``tolerance``, what was seen)."""
    import gc

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from modelkiln.targets.quality import NEXT_TOKEN_TOP1, next_token_kl, perplexity, score
    from modelkiln.targets.torchrt import TorchRuntime

    config = json.loads((folder / "config.json").read_text())
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], (CHECK_ROWS, CHECK_TOKENS))
    run = TorchRuntime().load(folder, file, device, os.cpu_count() or 1)
    measured = run({"input_ids": ids})
    del run
    gc.collect()
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").to(device).eval()
    with torch.inference_mode():
        loaded = model(torch.from_numpy(ids).to(device)).logits.float().cpu().numpy()
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    ratio = perplexity(measured, ids) / perplexity(loaded, ids)
    top1 = score(NEXT_TOKEN_TOP1, loaded, measured, None)
    return abs(ratio - 1) <= tolerance, (f"perplexity ratio {ratio:.4f}, next-token top-1 {top1:.4f}, "
                                         f"KL {next_token_kl(loaded, measured):.5f}")


@dataclass
class Served:
    """What the daemon's part left: its footprint, the catalogue's answers, the times."""

    footprint: Footprint
    serve_pid: int
    drop: float
    waited: float
    variants: list[dict]
    promoted: set[int]
    listing: str


def run_daemon(folder: Path, config, args, out: str | None) -> Served:
    """`kiln serve`, the drop, samples until every job ended (or the timeout), the stop."""
    serve = Serve(folder)
    try:
        serve.wait_started()
        footprint = Footprint(config.artifacts_path, serve.process.pid)
        drop = time.time()
        dropped = config.registry_path / MODEL
        (config.registry_path / ".staging" / MODEL).rename(dropped)
        print(f"dropped into {dropped}; kiln serve (pid {serve.process.pid}) at work", flush=True)
        _, line = wait_for_jobs(serve, footprint, folder / "kiln.toml", drop, args.timeout, args.every,
                                dropped if args.free_drop else None)
        waited = time.time() - drop
        print(f"after {waited:.0f} s: {line}", flush=True)
        footprint.sample()
    finally:
        if serve.process.poll() is None:
            serve.stop()
        if out:
            shutil.copyfile(folder / "serve.log", Path(out) / "serve.log")
    config_file = folder / "kiln.toml"
    served = json.loads(kiln("promoted", "--json", config=config_file))
    return Served(footprint, serve.process.pid, drop, waited,
                  json.loads(kiln("variants", MODEL, "--json", config=config_file)),
                  {e["variant_id"] for e in served if e["model"] == MODEL},
                  kiln("variants", MODEL, config=config_file))


def check_folders(run: Served, config, target: str, device: str, which: str) -> list[tuple[dict, bool, str]]:
    """Each measured variant's folder (or the promoted one's alone), the promoted one read
    through its ``promoted/`` link as a serving team would: (variant, passes, what was seen)."""
    import importlib.util

    tolerance = config.policy.max_quality_drop
    results = []
    for v in run.variants:
        if v["status"] != "succeeded" or (which == "promoted" and v["id"] not in run.promoted):
            continue
        weights = _document(v).get("weights") or {}
        path = config.promoted_path / MODEL / target if v["id"] in run.promoted else Path(v["path"])
        if weights.get("format") != "huggingface":
            seen = f"no Hugging Face folder: {weights.get('reason')}"
        elif weights.get("quantization") and importlib.util.find_spec("compressed_tensors") is None:
            seen = "quantized, and compressed-tensors is not installed (pip install -e '.[llm]')"
        else:
            try:
                ok, seen = check_folder(path, v["file"], device, tolerance)
            except Exception as exc:  # one folder that does not load must not hide the others'
                ok, seen = False, f"{type(exc).__name__}: {str(exc)[:200]}"
            results.append((v, ok, seen))
            print(f"  {'*' if v['id'] in run.promoted else ' '} {v['variant']}: {'loads' if ok else 'FAILS'}, "
                  f"{seen}", flush=True)
            continue
        results.append((v, False, seen))
        print(f"    {v['variant']}: {seen}", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, vocab 2048: the path, in minutes")
    parser.add_argument("--device", default="cuda", help="the target's device (cpu: the path without a GPU)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (default: 32, or 2 with --tiny)")
    parser.add_argument("--timeout", type=float, default=JOB_MINUTES * 60, help="seconds after the drop")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between disk and memory samples")
    parser.add_argument("--free-drop", action="store_true",
                        help="remove the dropped folder once the daemon has its snapshot (a 64 GB disk holds "
                             "two copies of a 7B and its variants only just)")
    parser.add_argument("--folders", choices=("all", "promoted"), default="all",
                        help="whose folders are loaded with transformers after the daemon stopped")
    parser.add_argument("--keep", action="store_true", help="keep the kiln folder (else removed at the end)")
    args = parser.parse_args()
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.stdout, Path(out) / "bench_llm_serve.txt")

    import torch

    from modelkiln.config import load_config

    device = args.device
    cuda = device.startswith("cuda")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}", flush=True)
    config_lm = lm_config(args)
    bandwidth = None
    if cuda:
        from bench_gpu import bandwidth_gb_s

        bandwidth = bandwidth_gb_s()
        print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    folder, target, changes = write_config(device)
    config = load_config(folder / "kiln.toml")
    print(f"kiln folder {folder}; `kiln init`'s config but for:\n" + "\n".join(f"  - {c}" for c in changes))
    print(f"  {target} recipes: {', '.join(config.targets[target].recipes)}", flush=True)
    staged = config.registry_path / ".staging" / MODEL / "1"
    staged.mkdir(parents=True)
    params = write_checkpoint(staged, config_lm, device, args.tiny)
    sizes = {"checkpoint": folder_bytes(staged), "weights": folder_bytes(staged, "*.safetensors")}

    run = run_daemon(folder, config, args, out)
    report(run, config, sizes, params, target, device, bandwidth)
    # The peer and the folders, after the daemon stopped: the GPU is this process's now.
    peer_ms = None
    if cuda:
        t0 = time.time()
        peer_ms = time_peer(config_lm, device)
        print(f"\npeer: transformers generate, bf16, static cache + compile: {peer_ms:.2f} ms/token "
              f"({time.time() - t0:.0f} s)", flush=True)
    print(f"\nfolders loaded by transformers alone against the measured programs ({args.folders}):", flush=True)
    folders = check_folders(run, config, target, device, args.folders)
    acceptance(run, config, sizes, params, target, bandwidth, peer_ms, folders, args.tiny)
    sys.stdout.flush()
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def report(run: Served, config, sizes: dict, params: int, target: str, device: str, bandwidth: float | None):
    """The jobs, the variants, `kiln variants` as it prints, and the footprint."""
    from modelkiln.sizes import format_size

    jobs, _, _ = job_rows(config, run.variants, run.drop)
    print_table(f"jobs of {MODEL}/1 (elapsed: seconds from lease to end; peak RSS of each phase's worker, "
                "variant.json)", jobs, ["job", "kind", "variant", "state", "elapsed s", "build peak RSS",
                                        "measure peak RSS", "reason"])
    floor_note = f"copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else "no floor on cpu"
    print_table(f"variants of a {_count(params)}-parameter Llama-2-shaped bf16 checkpoint, target {target} "
                f"({device}), as `kiln variants --json` gives them: decode ms per step with 1/8/32 sequences, "
                f"prefill ms; b1 vs floor: batch 1 over its safetensors' bytes read once ({floor_note})",
                variant_rows(run.variants, run.promoted, bandwidth),
                ["", "variant", "status", "b1 ms", "b8 ms", "b32 ms", "prefill 512", "prefill 2048",
                 "b1 vs floor", "size", "weights", "quality", "reason"])
    print("\n`kiln variants` as it prints:\n" + run.listing, flush=True)
    footprint = run.footprint
    worker_hwm, worker_command = footprint.worker_peak()
    print(f"checkpoint: {format_size(sizes['checkpoint'])} ({format_size(sizes['weights'])} of safetensors)")
    print(f"artifacts folder: peak {format_size(footprint.peak_disk)} on disk (hard links once; {footprint.samples} "
          f"samples), least free disk {format_size(footprint.least_free or 0)}")
    print(f"host memory: largest worker VmHWM {format_size(worker_hwm)} ({worker_command}); daemon tree's summed "
          f"Pss peak {format_size(footprint.peak_tree_pss)} (RSS {format_size(footprint.peak_tree_rss)}); "
          f"the daemon itself {format_size(footprint.hwm.get(run.serve_pid, (0, ''))[0])}", flush=True)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"


def acceptance(run: Served, config, sizes: dict, params: int, target: str, bandwidth: float | None,
               peer_ms: float | None, folders: list, tiny: bool) -> None:
    """Issue 33's checks of this benchmark, as PASS / FAIL lines."""
    from modelkiln.sizes import format_size

    measured = [v for v in run.variants if v["status"] == "succeeded"]
    checks = []

    def check(passed, text):
        checks.append(passed)
        print(("PASS  " if passed else "FAIL  ") + text if passed is not None else "n/a on cpu  " + text)

    print("\nacceptance (issue 33):")
    _, last_end, all_ended = job_rows(config, run.variants, run.drop)
    end_text = f"the last {last_end:.0f} s after the drop" if last_end is not None else "none ended"
    check(all_ended and last_end is not None and last_end <= JOB_MINUTES * 60,
          f"every job ended within {JOB_MINUTES} minutes: {'all ended' if all_ended else 'NOT all ended'}, {end_text}")
    snapshot = next(iter(config.artifacts_path.glob(f"{MODEL}/*/checkpoint")), None)
    variant_bytes = own_weight_bytes(measured, snapshot)
    disk_bound = (sizes["checkpoint"] + variant_bytes) * (1 + DISK_MARGIN)
    check(run.footprint.peak_disk <= disk_bound,
          f"peak disk {format_size(run.footprint.peak_disk)} <= checkpoint {format_size(sizes['checkpoint'])} + "
          f"variants' own weight files {format_size(variant_bytes)} + {DISK_MARGIN:.0%} = {format_size(disk_bound)}")
    recorded = max((p or 0 for v in measured for p in (_document(v).get("peak_rss_bytes") or {}).values()),
                   default=0)
    host_peak = max(run.footprint.worker_peak()[0], run.footprint.peak_tree_pss, recorded)
    memory_bound = HOST_MEMORY_FACTOR * sizes["checkpoint"]
    check(host_peak <= memory_bound,
          f"worker host memory {format_size(host_peak)} (the most of: a worker's VmHWM, the daemon tree's Pss, "
          f"variant.json's peak RSS) <= {HOST_MEMORY_FACTOR}x checkpoint = {format_size(memory_bound)}")
    if tiny:
        print("      (--tiny: an interpreter with torch, program graphs and reference outputs outweigh a model "
              "this small; the two checks above speak for the 7B)")
    sixteen = [v for v in measured if is_16_bit(v) and decode_figures(v)[0].get(1)]
    chosen = next((v for v in sixteen if v["id"] in run.promoted),
                  min(sixteen, key=lambda v: decode_figures(v)[0][1], default=None))
    which = "none measured" if chosen is None else chosen["variant"] + (
        " (promoted)" if chosen["id"] in run.promoted else " (fastest 16-bit; promoted: "
        + (", ".join(v["variant"] for v in measured if v["id"] in run.promoted) or "none") + ")")
    b1 = decode_figures(chosen)[0][1] if chosen else None
    if bandwidth is not None and peer_ms is not None:
        floor = params * 2 / (bandwidth * 1e9) * 1000
        check(b1 is not None and b1 <= FLOOR_FACTOR * floor,
              f"bf16 variant {which}: batch 1 {b1:.2f} ms/token <= {FLOOR_FACTOR}x the floor {floor:.2f} ms "
              f"({b1 / floor:.2f}x)" if b1 else f"bf16 variant: {which}")
        check(b1 is not None and peer_ms >= PEER_FACTOR * b1,
              f"bf16 variant {b1:.2f} ms/token at least {PEER_FACTOR}x faster than transformers' static cache + "
              f"compile {peer_ms:.2f} ms/token ({peer_ms / b1:.2f}x)" if b1 else "no bf16 decode figure")
    else:
        check(None, f"bf16 variant {which} ({ms(b1)} ms/token) against the bandwidth floor")
        check(None, "bf16 variant against transformers' static cache + compile")
    missing = []
    for v in measured:
        batches, prefill = decode_figures(v)
        lacks = [f"batch {b}" for b in DECODE_BATCHES if b not in batches] + \
            (["prefill 2048"] if 2048 not in prefill else [])
        if lacks:
            missing.append(f"{v['variant']}: {', '.join(lacks)}")
    shown = "32:" in run.listing and "prefill 2048" in run.listing
    check(bool(measured) and not missing and shown,
          f"decode at batch 1/8/32 and prefill at 2048 in `kiln variants`, all {len(measured)} measured variants"
          + (f"; missing: {'; '.join(missing)}" if missing else ""))
    failed = [f"{v['variant']} ({seen})" for v, ok, seen in folders if not ok]
    check(bool(folders) and not failed and any(v["id"] in run.promoted for v, _, _ in folders),
          f"the folders (the promoted one through promoted/{MODEL}/{target}) load with transformers alone, logits "
          f"within the gate's {config.policy.max_quality_drop:.0%} of the measured program"
          + (f"; not: {'; '.join(failed)}" if failed else ""))
    print(f"\n{sum(c is True for c in checks)} of {sum(c is not None for c in checks)} checks pass; "
          f"{len(measured)} of {len(run.variants)} variants measured; the daemon's part took {run.waited:.0f} s")


if __name__ == "__main__":
    main()
