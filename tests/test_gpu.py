"""cuda targets: waiting where the host has no GPU, and the real thing where it has one.

The GPU tests skip on a host without CUDA with the reason; `bench/bench_gpu.py` runs
them and the GPU figures on the lent GPU machine in one call.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import optimize_once
from test_pipeline import all_variants

RECIPES = 'recipes = ["baseline", "quantize.int8_dynamic"]'
GPU_TARGET = """
[targets.gpu]
device = "cuda"
runtimes = ["torch"]
batch_sizes = [1, 4]
recipes = ["baseline", "quantize.bf16", "quantize.fp16", "quantize.fp16 -> compile.inductor"]
"""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (run bench/bench_gpu.py on the GPU machine)")


@pytest.mark.skipif(_cuda_available(), reason="this host has a GPU: the cuda target is available here")
def test_a_cuda_target_waits_on_a_host_without_a_gpu(kiln_dir, digits_checkpoint):
    from modelkiln.config import load_config
    from modelkiln.daemon.service import Daemon
    from modelkiln.plugins.api import FoundCheckpoint
    from modelkiln.store import queries
    from modelkiln.store.db import open_store
    from modelkiln.store.models import Checkpoint, Job

    (kiln_dir / "kiln.toml").write_text((kiln_dir / "kiln.toml").read_text() + GPU_TARGET)
    out = subprocess.run([sys.executable, "-m", "modelkiln", "targets", "--json", "--config",
                          str(kiln_dir / "kiln.toml")], capture_output=True, text=True, check=True)
    gpu = next(t for t in json.loads(out.stdout) if t["target"] == "gpu")
    assert not gpu["available"] and "no NVIDIA GPU on this host" in gpu["reason"]

    config = load_config(kiln_dir / "kiln.toml")
    daemon = Daemon(config, watch=False, schedule=False)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint("digits", "1", digits_checkpoint))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            daemon.run_once(0.05)
            with daemon.store.session() as session:
                if [p for p in queries.current_promotions(session) if p.target == "cpu"]:
                    break
        for _ in range(20):  # the daemon keeps going; the gpu jobs are never leased
            daemon.run_once(0.05)
    finally:
        daemon.stop(5)
    with open_store(config).session() as session:
        assert [p.target for p in queries.current_promotions(session)] == ["cpu"]
        gpu_jobs = [j for j in session.query(Job).all() if j.target == "gpu"]
        assert len(gpu_jobs) == 4 and {(j.state, j.attempts) for j in gpu_jobs} == {("pending", 0)}
        assert session.get(Checkpoint, checkpoint_id).status == "ready"  # not done, not failed
    gpu_variants = [v for v in all_variants(config, "digits") if v["target"] == "gpu"]
    assert {v["status"] for v in gpu_variants} == {"pending"}


@needs_gpu
def test_a_cuda_target_measures_on_the_gpu_and_promotes(kiln_dir, digits_checkpoint):
    from modelkiln.config import load_config
    from modelkiln.targets.compiled import serving_entry

    text = (kiln_dir / "kiln.toml").read_text()
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    (kiln_dir / "kiln.toml").write_text(text.replace(cpu, GPU_TARGET.strip() + "\n\n"))
    config = load_config(kiln_dir / "kiln.toml")
    # Inductor compiles at load in the measurement: over two minutes on a cold GPU machine.
    checkpoint = optimize_once(config, digits_checkpoint, "digits", timeout=300)
    assert checkpoint.status == "done", checkpoint.reason
    variants = {v["variant"]: v for v in all_variants(config, "digits")}
    assert {v["status"] for v in variants.values()} == {"succeeded"}, {k: v.get("reason") for k, v in variants.items()}
    base = variants["torch:baseline"]["metrics"]
    for half in ("torch:quantize.bf16", "torch:quantize.fp16"):
        m = variants[half]["metrics"]
        assert (base["quality"] - m["quality"]) / base["quality"] <= 0.01
        assert m["size_bytes"] < 0.6 * base["size_bytes"]
    compiled = variants["torch:quantize.fp16 -> compile.inductor"]
    # The mode and the Inductor options it stands for (compiled.py), as serving code passes them.
    expected = json.loads(json.dumps({"compile": serving_entry("reduce-overhead")}))
    assert json.loads((Path(compiled["path"]) / "serving.json").read_text()) == expected
    document = json.loads((config.promoted_path / "digits" / "gpu" / "variant.json").read_text())
    # GPU memory, from torch.cuda.max_memory_allocated: at least the weights.
    assert all(b["peak_memory_bytes"] > 100_000 for b in document["metrics"]["batches"])


def test_cuda_graphs_are_skipped_on_a_cpu_target(tmp_path):
    from modelkiln.errors import StepNotApplicable
    from modelkiln.plugins.api import TORCH, ModelHandle, StepContext
    from modelkiln.steps.compiler import Inductor

    context = StepContext(tmp_path, "cpu", "torch", "cpu", 2, {})
    model = ModelHandle(TORCH, object(), [])
    with pytest.raises(StepNotApplicable, match="uses CUDA graphs; target cpu is cpu"):
        Inductor().apply(model, {"mode": "reduce-overhead"}, context)
    compiled = Inductor().apply(model, {"mode": "default"}, context)
    assert compiled.notes == {"compile": "default"}


@needs_gpu
def test_a_causal_lm_decodes_on_the_gpu(kiln_dir, tmp_path):
    from test_decoding import check_decoding

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text()
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    int4 = "quantize.bf16 -> quantize.weight_only(bits=4, block_size=64) -> compile.inductor"
    gpu = GPU_TARGET.strip().replace('"quantize.fp16", ', "").replace(
        '"quantize.fp16 -> compile.inductor"', f'"quantize.bf16 -> compile.inductor", "{int4}"')
    (kiln_dir / "kiln.toml").write_text(text.replace(cpu, gpu + "\n\n"))
    variants = check_decoding(load_config(kiln_dir / "kiln.toml"), tmp_path, "cuda")
    assert {v["recipe"] for v in variants} == {"baseline", "quantize.bf16", "quantize.bf16 -> compile.inductor", int4}
    by_recipe = {v["recipe"]: v for v in variants}
    # modelkiln's own kernel where Triton is installed (torch's CUDA builds bring it).
    assert by_recipe[int4]["lineage"][1]["record"]["kernel"].startswith("modelkiln int4_mm")
    serving = json.loads((Path(by_recipe[int4]["path"]) / "serving.json").read_text())
    assert serving["int4_mm"]["served_by"][0]["tokens"][0] == 1 and "register_op" in serving["int4_mm"]["load"]
    # Everything the variant loaded, with the largest batch's KV caches, on the device.
    assert all(v["metrics"]["decode"]["peak_device_bytes"] > 0 for v in variants)


@needs_gpu
def test_fp8_and_error_feedback_int4_variants_of_a_causal_lm_on_the_gpu(kiln_dir, tmp_path):
    """FP8 W8A8 and W8A16 through the daemon on the GPU (skipped with the reason where it
    has no FP8), and int4 whose integers error feedback chose on the checkpoint's text:
    decode figures, each folder loads in transformers and answers as measured."""
    import torch

    from test_decoding import check_decoding
    from test_llm_folder import check_llm_folders

    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text()
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    fp8 = "quantize.bf16 -> quantize.fp8 -> compile.inductor"
    fp8_weights = "quantize.bf16 -> quantize.fp8_weight_only"
    gptq = "quantize.bf16 -> quantize.weight_only(bits=4, block_size=64)"
    has_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    recipes = ["baseline", gptq] + ([fp8, fp8_weights] if has_fp8 else [])
    gpu = GPU_TARGET.strip().replace(GPU_TARGET.strip().splitlines()[-1], f"recipes = {json.dumps(recipes)}")
    (kiln_dir / "kiln.toml").write_text(text.replace(cpu, gpu + "\n\n"))
    config = load_config(kiln_dir / "kiln.toml")
    variants = check_decoding(config, tmp_path, "cuda", with_text=True, with_train=True)
    by_recipe = {v["recipe"]: v for v in variants}
    assert by_recipe[gptq]["lineage"][1]["record"]["method"] == "gptq"
    record = by_recipe[gptq]["lineage"][1]["record"]
    assert record["output_error"] < record["rtn_output_error"], record
    if has_fp8:
        assert by_recipe[fp8]["lineage"][1]["record"]["scheme"].startswith("W8A8 FP8")
    for variant in variants:
        assert variant["metrics"]["quality"] >= 0.97, (variant["recipe"], variant["metrics"]["quality"])
    check_llm_folders(config, variants, device="cuda", target="gpu")


@needs_gpu
@pytest.mark.parametrize("kernel", ["tinygemm", "int4_mm"])
def test_int4_weights_on_cuda_use_the_packed_kernel_and_survive_export(tmp_path, kernel):
    import torch

    from modelkiln.plugins.api import TORCH, ModelHandle, StepContext
    from modelkiln.steps.weight_only import WeightOnly

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 40),
                                torch.nn.Linear(40, 8)).eval()  # the last: 40 inputs, no int4 tiling
    x = torch.randn(3, 256)
    with torch.no_grad():
        expected = model(x)
    context = StepContext(tmp_path, "gpu", "torch", "cuda", 1, {})
    quantized = WeightOnly().apply(ModelHandle(TORCH, model, []),
                                   {"bits": 4, "block_size": 64, "kernel": kernel}, context).obj
    assert "int4" in context.record["kernel"]
    if kernel == "tinygemm":
        assert context.record["quantized_layers"] == 2
        assert type(quantized[0]).__name__ == "Int4WeightLinear" and isinstance(quantized[3], torch.nn.Linear)
        assert quantized[0].packed.device.type == "cuda"  # packed on the GPU though the model was on the cpu
    else:  # the stored form as it is: every width divisible by 8 with whole groups
        assert type(quantized[0]).__name__ == "Int4StoredLinear"
        assert quantized[0].weight_packed.dtype == torch.int32 and quantized[0].weight_packed.device.type == "cuda"
    quantized = quantized.cuda()
    with torch.no_grad():
        got = quantized(x.cuda()).float().cpu()
    error = (got - expected).norm() / expected.norm()
    assert error < 0.1, error  # 4-bit weights: close, not equal
    program = torch.export.export(quantized, (x.cuda(),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.cuda()).float().cpu(), got)
    with pytest.raises(Exception, match="block_size 32, 64 or 128"):
        WeightOnly().apply(ModelHandle(TORCH, model, []), {"bits": 4, "block_size": 16}, context)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)])
def test_a_one_rank_group_serves_the_tensor_parallel_decoding_path(tmp_path, device):
    """A real split needs two devices (nvidia-h200-x2 for cuda: bench/bench_llm_tp.py);
    one rank still runs the whole path on one GPU: the NCCL launch, the rank's exported
    programs on its device, the request header (decode steps inline), the check and the
    decoding figures."""
    import numpy as np
    import torch
    from test_decoding import tiny_llama

    from modelkiln.plugins.api import SHARDED, InputSpec, ModelHandle
    from modelkiln.steps.shard import ShardedModel, find_head_splits, find_splits, split_module
    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.targets import sharded
    from modelkiln.targets.decoding import NEW_TOKENS, PROMPT_TOKENS, prompt_ids

    model = tiny_llama()
    wrapper = hf_wrapper(model)
    ids = torch.randint(0, 256, (4, 16))
    splits = find_splits(wrapper, (ids[:2],), 1) + find_head_splits(wrapper, 1)
    assert len(splits) == 4  # two MLPs and two attention blocks, each "split" into one part
    with torch.inference_mode():
        expected = wrapper(ids).numpy()
    rank = split_module(wrapper, splits, 0, 1).to(f"{device}:0" if device == "cuda" else "cpu")
    handle = ModelHandle(SHARDED, ShardedModel([rank], splits, {"input_ids": ids.numpy()}, expected),
                         [InputSpec("input_ids", (-1, 16), "int64", 256)])
    assert sharded.save(handle, tmp_path) == sharded.PLAN_FILE
    plan = json.loads((tmp_path / sharded.PLAN_FILE).read_text())
    assert plan["decode"]["files"] == ["rank0/decode.pt2"]
    group = sharded.load(tmp_path, device, 2)
    try:
        check = group.details["shard_check"]
        assert check["max_abs_diff"] <= check["tolerance"]
        assert np.allclose(group({"input_ids": ids[:1].numpy()}), expected[:1], atol=1e-4)
        decode = group.time_decoding()
    finally:
        group.close()
    prompt = torch.from_numpy(prompt_ids(256)).to(device)
    tokens = model.to(device).generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       do_sample=False)[0, PROMPT_TOKENS:].tolist()
    assert decode["tokens"] == tokens and decode["decode_ms_per_token"] > 0


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _one_shot_rank(rank: int, port: int, results) -> None:
    """One of two ranks: the one-shot program, compiled with CUDA graphs, against NCCL's
    eager sum of the same partial products, at a decoding step's and a prefill's length."""
    import torch
    import torch.distributed as dist

    from test_collectives import RowParallel

    from modelkiln.targets.collectives import use_one_shot
    from modelkiln.targets.compiled import compile_loaded, serving_entry

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank its own slice of the weights
    module = RowParallel().cuda()
    positions = torch.export.Dim("positions", min=1, max=63)
    program = torch.export.export(module, (torch.randn(1, 4, 8, device="cuda"),), dynamic_shapes=({1: positions},))
    rewritten = program.module()
    replaced = use_one_shot(rewritten, "0", f"cuda:{rank}")
    compiled = compile_loaded(rewritten, serving_entry("reduce-overhead"))
    worst = 0.0
    for length in (1, 32, 1, 32):
        torch.manual_seed(100 + length)
        x = torch.randn(1, length, 8, device="cuda")
        got = compiled(x).clone()
        want = module(x)  # the functional all-reduce run eagerly: NCCL
        worst = max(worst, float((got - want).abs().max()))
    results.put((rank, replaced, worst))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA GPUs (the nvidia-h200-x2 machine)")
def test_two_ranks_sum_with_the_one_shot_kernel_as_nccl_does():
    import multiprocessing

    from modelkiln.targets.collectives import one_shot_available
    from modelkiln.targets.sharded import _free_port

    reason = one_shot_available("cuda", 2)
    if reason is not None:
        pytest.skip(reason)
    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=_one_shot_rank, args=(r, port, results)) for r in range(2)]
    for process in ranks:
        process.start()
    found = sorted(results.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(60)
    assert [replaced for _, replaced, _ in found] == [1, 1]
    assert all(worst <= 1e-4 for _, _, worst in found), found


@needs_gpu
def test_a_sparse24_variant_serves_its_weights_through_the_sparse_kernels(kiln_dir, digits_checkpoint):
    import torch
    from torch.sparse import SparseSemiStructuredTensor

    from modelkiln.config import load_config
    from modelkiln.targets.semistructured import CudaGraphs, has_pattern
    from modelkiln.targets.torchrt import TorchRuntime

    text = (kiln_dir / "kiln.toml").read_text()
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    sparse = "prune.sparse24 -> quantize.fp16 -> compile.inductor"
    gpu = GPU_TARGET.strip().replace('recipes = ["baseline", "quantize.bf16", "quantize.fp16", ',
                                     f'recipes = ["baseline", "{sparse}", "prune.sparse24", ')
    (kiln_dir / "kiln.toml").write_text(text.replace(cpu, gpu + "\n\n"))
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, digits_checkpoint, "digits", timeout=300)
    assert checkpoint.status == "done", checkpoint.reason
    variants = {v["recipe"]: v for v in all_variants(config, "digits")}
    assert variants["prune.sparse24"]["status"] == "skipped"  # float32 weights: the kernels take 16 bits
    assert "put quantize.bf16 (or fp16) after prune.sparse24" in variants["prune.sparse24"]["reason"]
    variant = variants[sparse]
    assert variant["status"] == "succeeded", variant.get("reason")
    record = variant["lineage"][0]["record"]
    assert record["sparse_layers"] == 2 and record["dense_layers"] == {"4": "10 x 512: not multiples of 16"}, record
    assert record["recovery_steps"] > 0
    base = variants["baseline"]["metrics"]["quality"]
    assert (base - variant["metrics"]["quality"]) / base < 0.05  # 2:4 after recovery on digits: close

    folder = Path(variant["path"])
    serving = json.loads((folder / "serving.json").read_text())
    assert serving["sparse24"]["weights"] >= 2
    loaded = TorchRuntime().load(folder, "model.pt2", "cuda", 1)
    assert isinstance(loaded.module, CudaGraphs)
    weights = list(loaded.module.module.parameters())
    assert sum(isinstance(w, SparseSemiStructuredTensor) for w in weights) == serving["sparse24"]["weights"]
    # The program alone (masked weights, dense kernels) answers the same: serving code
    # without the sparse kernels gets the same model, only slower.
    plain = torch.export.load(str(folder / "model.pt2")).module().cuda()
    assert sum(has_pattern(p.detach()) for p in plain.parameters()) == serving["sparse24"]["weights"]
    name = json.loads((folder / "variant.json").read_text())["inputs"][0]["name"]
    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = plain(torch.from_numpy(x).cuda()).float().cpu().numpy()
    for _ in range(2):  # captured, then replayed
        np.testing.assert_allclose(loaded({name: x}), expected, rtol=0.02, atol=0.02)
