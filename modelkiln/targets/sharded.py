"""Saving and serving a tensor-parallel variant: one process per rank.

The artifact is a folder::

    plan.json          ranks, backend, process-group name, the splits, the check,
                       and with compile.inductor the torch.compile options
    rank0/model.pt2    each rank's torch.export program (its all-reduces are traced
    rank1/model.pt2    functional collectives on the default process group)
    rank0/decode.pt2   for a causal LM, each rank's static-cache decoding program
    rank1/decode.pt2   (``decoding.py``), its KV cache holding that rank's heads only
    check.npz          a few input rows and the unsharded model's outputs on them
    greedy_check.npz   for a causal LM: prompts, the unsharded model's greedy tokens after
                       them, and each token's logit margin over the runner-up

Serving it is what ``load`` does, and what serving code would do with torchrun: start
one process per rank, join them into a process group (gloo on cpu, NCCL on cuda), load
each rank's program and compile it as the plan says (with CUDA graphs the all-reduces are
captured inside each rank's graph; on GPUs that read each other's memory the small ones
are one-shot all-reduces over symmetric memory, ``collectives.py``). The calling process is rank 0: it receives a
request, broadcasts the inputs to the other ranks, and every rank runs its program; the
programs' all-reduces combine the partial results, so rank 0's output is the model's
output.

Decoding is different: every rank holds the whole logits after the last all-reduce, so
every rank picks the same greedy token, and a generation runs on all ranks at once from
one request (the prompt and how many tokens), each feeding its own tokens back, with no
communication per token besides the programs' own all-reduces.

Every load first runs the check rows and compares them with the unsharded outputs, and
for a causal LM generates greedily from the check prompts and compares the tokens with
the unsharded model's; a sharded variant that does not compute the same function fails
its measurement.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable
from ..plugins.api import TORCH, ModelHandle
from . import decoding
from .compiled import compile_loaded, serving_entry

PLAN_FILE = "plan.json"
# The default process group's name in torch.distributed; the loader checks it matches.
WORLD_GROUP = "0"
CHECK_FILE = "check.npz"
GREEDY_FILE = "greedy_check.npz"
PLAN_FORMAT = "modelkiln.tensor_parallel/1"
# The sharded and unsharded outputs may differ by the order of a sum: within this share
# of the output's scale (max |x|, at least 1) they are taken as equal.
RELATIVE_TOLERANCE = 1e-4
# The header broadcast before each request: input count, program, whether the inputs'
# values follow inline, then (dtype code, rank, dims) per input, then those values.
_HEADER = 64
# Requests: a forward call; the decoding measurement (``decoding.time_decoding``), run by
# every rank; greedy generation from prompts, run by every rank.
_FORWARD, _TIME_DECODING, _GREEDY = 0, 1, 2
_DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "float64"]
_START_TIMEOUT = timedelta(seconds=120)


# A 16-bit model's check allows this many times its own rounding (its outputs' distance
# from float32's, measured when it was sharded) on top of the float32 tolerance.
ROUNDING_FACTOR = 2.0


def tolerance(expected: np.ndarray, rounding: float = 0.0) -> float:
    scale = max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
    return RELATIVE_TOLERANCE * scale + ROUNDING_FACTOR * rounding


def save(model, directory: Path) -> str:
    """Export every rank's module of a SHARDED ``model``, write the plan; return its name."""
    import torch

    from .shapes import dynamic_shapes, example_args

    sharded = model.obj
    ranks = len(sharded.ranks)
    files = []
    decode: dict = {}  # a causal LM's decoding programs, as _save_decoder fills it
    for rank, module in enumerate(sharded.ranks):
        args = example_args(ModelHandle(TORCH, module, model.inputs))  # on the rank's device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(module, model.inputs))
            except Exception as exc:
                raise StepNotApplicable(f"rank {rank}'s module cannot be exported: {exc}") from None
        file = f"rank{rank}/model.pt2"
        (directory / file).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(directory / file))
        files.append(file)
        decode = _save_decoder(module, rank, directory, decode)
    np.savez(directory / CHECK_FILE, outputs=sharded.check_outputs,
             **{f"input:{k}": v for k, v in sharded.check_inputs.items()})
    plan = {
        "format": PLAN_FORMAT,
        "ranks": ranks,
        "group": WORLD_GROUP,
        "files": files,
        "inputs": [i.name for i in model.inputs],
        "splits": [s.as_dict() for s in sharded.splits],
        "split_parameters": sharded.split_parameters,
        "replicated_parameters": sharded.replicated_parameters,
        "check": CHECK_FILE,
        "relative_tolerance": RELATIVE_TOLERANCE,
        "check_rounding": sharded.check_rounding,
    }
    if decode:
        plan["decode"] = decode
    if sharded.greedy is not None and "files" in decode:
        np.savez(directory / GREEDY_FILE, **sharded.greedy)
        plan["greedy_check"] = GREEDY_FILE
    if model.notes.get("compile"):
        plan["compile"] = serving_entry(model.notes["compile"])
    (directory / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return PLAN_FILE


def _save_decoder(module, rank: int, directory: Path, decode: dict) -> dict:
    """Save rank ``rank``'s decoding program if the model is a causal LM; the plan's
    ``decode`` entry so far, or why there is none (the forward programs still serve)."""
    if "error" in decode:
        return decode
    # Batch 1 only: the ranks' programs are measured as one sequence decoding.
    saved = decoding.save_decoders(module, directory / f"rank{rank}")
    if saved is None:
        return decode
    if "error" in saved:
        return {"error": f"rank {rank}: {saved['error']}"}
    file = f"rank{rank}/{saved.pop('file')}"
    return {"files": [*decode.get("files", []), file], **saved}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") else "cpu"


def _join(rank: int, ranks: int, port: int, device: str, threads: int, directory: Path, plan: dict):
    """Join the process group as ``rank`` and load that rank's programs; the programs,
    and which all-reduce they use (``fast_all_reduces``)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks, timeout=_START_TIMEOUT)
    world = dist.group.WORLD
    assert world is not None  # init_process_group made it
    if world.group_name != plan["group"]:
        raise RuntimeError(f"process group is named {world.group_name!r}, "
                           f"the programs were traced for {plan['group']!r}")
    local = _rank_device(device, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        programs = [torch.export.load(str(directory / plan["files"][rank])).module().to(local)]
        decode = plan.get("decode", {})
        if "files" in decode:
            programs.append(torch.export.load(str(directory / decode["files"][rank])).module().to(local))
    all_reduce = fast_all_reduces(programs, plan["group"], device, ranks, local)
    if "compile" in plan:  # each rank compiles its own; the first call of each shape pays it
        programs = [compile_loaded(program, plan["compile"]) for program in programs]
    return programs, all_reduce


def fast_all_reduces(programs, group: str, device: str, ranks: int, local: str) -> str:
    """Put one-shot all-reduces over symmetric memory in place of the programs' small
    NCCL ones where the GPUs can read each other's memory (``collectives.py``); what the
    ranks use, in words. Every rank calls it with the same programs in the same order."""
    from .collectives import one_shot_available, use_one_shot

    why = one_shot_available(device, ranks)
    if why is not None:
        return f"{_backend(device)} ({why})" if device.startswith("cuda") else _backend(device)
    replaced = sum(use_one_shot(program, group, local) for program in programs)
    return f"one-shot over symmetric memory for {replaced} all-reduces of small messages, nccl for the rest"


def _call(programs, program: int, tensors, plan: dict, device: str):
    """Run request ``program`` on this rank; every rank gets the same result."""
    if program == _TIME_DECODING:
        return decoding.time_decoding(programs[1], plan["decode"]["vocab_size"], device)
    if program == _GREEDY:
        prompts, new_tokens = tensors[0].cpu().numpy(), int(tensors[1])
        return [decoding.greedy_tokens(programs[1], prompt, new_tokens, device) for prompt in prompts]
    return programs[_FORWARD](*tensors)


def _receive(device: str) -> tuple[int, list] | None:
    """The next request, broadcast from rank 0: ``(program, inputs)``; None when told to stop."""
    import torch
    import torch.distributed as dist

    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    values = header.tolist()
    count, program, inline = values[:3]
    if count < 0:
        return None
    shapes, at = [], 3
    for _ in range(count):
        dtype, ndim = _DTYPES[values[at]], values[at + 1]
        shapes.append((getattr(torch, dtype), values[at + 2: at + 2 + ndim]))
        at += 2 + ndim
    tensors = []
    for dtype, shape in shapes:
        if inline:
            size = int(np.prod(shape))
            tensors.append(torch.tensor(values[at:at + size], dtype=dtype, device=device).reshape(shape))
            at += size
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, 0)
            tensors.append(tensor)
    return program, tensors


def _send(tensors, device: str, program: int = _FORWARD) -> None:
    import torch
    import torch.distributed as dist

    values = [len(tensors), program, 0]
    for t in tensors:
        values += [_DTYPES.index(str(t.dtype).removeprefix("torch.")), t.dim(), *t.shape]
    if len(values) > _HEADER:
        raise ValueError("too many or too high-dimensional inputs for the rank header")
    # A decoding step's token ids and positions are a few integers: sent in the header
    # itself, one broadcast per step instead of three.
    small = sum(t.numel() for t in tensors)
    inline = all(not t.is_floating_point() for t in tensors) and len(values) + small <= _HEADER
    if inline:
        values[2] = 1
        for t in tensors:
            values += t.reshape(-1).tolist()
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(header, 0)
    if not inline:
        for t in tensors:
            dist.broadcast(t, 0)


def _stop(device: str) -> None:
    import torch
    import torch.distributed as dist

    header = torch.full((_HEADER,), -1, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)


def rank_main(rank: int, ranks: int, port: int, device: str, threads: int, directory: str, plan: dict) -> None:
    """A rank other than 0: run the program on whatever rank 0 broadcasts, until told to stop."""
    import torch
    import torch.distributed as dist

    from ..children import die_with_parent, leave_signals_to_parent

    die_with_parent()
    leave_signals_to_parent()
    programs, _ = _join(rank, ranks, port, device, threads, Path(directory), plan)
    local = _rank_device(device, rank)
    with torch.inference_mode():
        while (request := _receive(local)) is not None:
            program, tensors = request
            _call(programs, program, tensors, plan, local)
    dist.destroy_process_group()


class RankGroup:
    """Rank 0 in this process, ranks 1..N-1 in processes it started."""

    # The ranks take one request at a time, over their pipes: no concurrent callers.
    concurrent = False

    def __init__(self, directory: Path, device: str, threads: int):
        self.directory = directory
        self.plan = json.loads((directory / PLAN_FILE).read_text())
        if self.plan.get("format") != PLAN_FORMAT:
            raise ValueError(f"{directory / PLAN_FILE}: not a {PLAN_FORMAT} plan")
        self.ranks = self.plan["ranks"]
        self.device = device
        self.local = _rank_device(device, 0)
        per_rank = max(1, threads // self.ranks)  # the target's threads are shared by its ranks
        port = _free_port()
        # spawn, not fork: a rank must not inherit this process's thread pools (or CUDA).
        context = multiprocessing.get_context("spawn")
        self.processes = [
            context.Process(target=rank_main, name=f"kiln-rank{rank}", daemon=True,
                            args=(rank, self.ranks, port, device, per_rank, str(directory), self.plan))
            for rank in range(1, self.ranks)
        ]
        for process in self.processes:
            process.start()
        self.programs, self.all_reduce = _join(0, self.ranks, port, device, per_rank, directory, self.plan)
        self.closed = False
        self.details: dict = {}  # what ``load``'s equality check found, for the measurement's checks
        atexit.register(self.close)
        if "files" in self.plan.get("decode", {}):
            # A causal LM: prefill and per-token decode, every rank running the same loop.
            self.time_decoding = lambda: self._request(_TIME_DECODING, [])

    def _request(self, program: int, tensors: list):
        import torch

        with torch.inference_mode():
            _send(tensors, self.local, program)
            return _call(self.programs, program, tensors, self.plan, self.local)

    def __call__(self, inputs: dict) -> np.ndarray:
        import torch

        out = self._request(_FORWARD, [torch.from_numpy(v).to(self.local) for v in inputs.values()])
        return out.float().cpu().numpy()

    def greedy(self, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
        """Greedy tokens of each prompt (rows of equal length), generated on every rank."""
        import torch

        tensors = [torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64)).to(self.local),
                   torch.tensor([new_tokens], dtype=torch.int64, device=self.local)]
        return self._request(_GREEDY, tensors)

    def check(self) -> dict:
        """Compare the outputs on the check rows with the unsharded model's."""
        with np.load(self.directory / self.plan["check"], allow_pickle=False) as npz:
            expected = npz["outputs"]
            rows = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("input:")}
        got = self(rows)
        diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
        limit = tolerance(expected, self.plan.get("check_rounding", 0.0))
        if not diff <= limit:
            raise RuntimeError(
                f"the {self.ranks}-rank output differs from the unsharded model's by {diff:.3g} "
                f"(tolerance {limit:.3g}): the split is wrong for this model"
            )
        found = {"ranks": self.ranks, "max_abs_diff": diff, "tolerance": limit, "rows": int(len(expected)),
                 "all_reduce": self.all_reduce}
        if "greedy_check" in self.plan:
            found.update(self._check_greedy(limit))
        return found

    def _check_greedy(self, limit: float) -> dict:
        """Greedy tokens over the ranks against the unsharded model's on the check prompts.
        Where they first differ, the unsharded model's two best logits must have been
        within twice the check's tolerance of each other (a tie that rounding may break
        either way); the rest of that prompt's tokens follow another path and are not
        compared. Any other difference fails the check."""
        with np.load(self.directory / self.plan["greedy_check"], allow_pickle=False) as npz:
            prompts, expected, margins = npz["prompts"], npz["tokens"], npz["margins"]
        got = self.greedy(prompts, expected.shape[1])
        equal, ties = 0, 0
        for row, (tokens, want, margin) in enumerate(zip(got, expected.tolist(), margins)):
            for position, (token, wanted) in enumerate(zip(tokens, want)):
                if token == wanted:
                    equal += 1
                    continue
                if margin[position] > 2 * limit:
                    raise RuntimeError(
                        f"greedy decoding over {self.ranks} ranks chose token {token} where the unsharded "
                        f"model chooses {wanted} (prompt {row}, new token {position}; its top two logits "
                        f"{margin[position]:.3g} apart, tolerance {2 * limit:.3g}): the split is wrong for this model")
                ties += 1
                break
        return {"greedy_prompts": int(len(prompts)), "greedy_positions": int(expected.size),
                "greedy_equal": equal, "greedy_ties": ties, "greedy_tokens": got}

    def close(self) -> None:
        import torch.distributed as dist

        if self.closed:
            return
        self.closed = True
        try:
            _stop(self.local)
            dist.destroy_process_group()
        except Exception:
            pass  # a rank already gone: its process is reaped below either way
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def load(directory: Path, device: str, threads: int):
    """``run(inputs) -> ndarray`` over the ranks, after the equality check passed."""
    group = RankGroup(directory, device, threads)
    try:
        details = group.check()
    except Exception:
        group.close()
        raise
    group.details = {"shard_check": details}
    return group
