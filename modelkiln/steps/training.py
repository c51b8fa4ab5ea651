"""Knowledge distillation, shared by the steps that train a smaller model from the original."""

from __future__ import annotations

import time

from ..errors import StepNotApplicable
from ..plugins.api import MASK, TORCH, Param, Step


def training_data(context) -> tuple[dict, str]:
    """The unlabelled inputs a step trains on, and where they came from: settled by the
    inspect phase (``pipeline.heldout``), none of them equal to a quality sample unless
    the checkpoint left nothing else, which the lineage records and the policy refuses."""
    split = context.split or {}
    source = context.training_source
    if split.get("trained_on_samples"):
        source = f"{source} (the quality samples themselves: no other rows to train on)"
    if context.training_inputs is not None:
        return context.training_inputs, source
    return context.sample_inputs, f"{source} (the quality samples themselves)"


# A training step's time budget when its recipe sets none (max_seconds = 0): a minute,
# plus a second per two million parameters, at most 15 minutes. Recovery from pruning or
# depth distillation goes on improving for hours; what it buys per minute falls fast, and
# every other recipe of the checkpoint waits behind it.
AUTO_BASE_SECONDS = 60.0
AUTO_SECONDS_PER_PARAMETER = 0.5e-6
AUTO_MOST_SECONDS = 900.0
# Steps a training step runs at least, past its time budget if need be (never more than
# it plans): a host busy with other work must not turn a training step into a few
# updates, so that what is promoted does not hang on the host's load.
MIN_STEPS = 20
# Activations kept for the backward pass may take this share of the worker's memory, and
# never more than ACTIVATIONS_MOST: training runs on the CPU, where a larger batch costs
# memory and buys no speed (the work per sample is the same).
ACTIVATIONS_SHARE = 0.25
ACTIVATIONS_MOST = 2**30
# The backward pass holds about as much again as the activations it reads.
BACKWARD_FACTOR = 2.0


def time_budget(max_seconds: float, parameters: int) -> float:
    """``max_seconds``, or where that is 0 the automatic budget for a model this size."""
    if max_seconds > 0:
        return max_seconds
    return min(AUTO_MOST_SECONDS, AUTO_BASE_SECONDS + parameters * AUTO_SECONDS_PER_PARAMETER)


def expected_training_seconds(max_seconds: float, size_bytes: int) -> float:
    """What planning expects a training step to take (the weights taken as float32)."""
    return time_budget(max_seconds, size_bytes // 4)


def activation_bytes_per_sample(student, arrays: list) -> int:
    """Bytes the forward pass keeps for backward, per sample: the tensors autograd saves
    on two samples (storages counted once), halved."""
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows = min(2, len(arrays[0]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        student(*(a[:rows] for a in arrays))
    return max(1, sum(storages.values()) // rows)


def fit_batch_size(wanted: int, per_sample: int, worker_memory_mb: int) -> int:
    budget = ACTIVATIONS_MOST
    if worker_memory_mb > 0:
        budget = min(budget, int(worker_memory_mb * 2**20 * ACTIVATIONS_SHARE))
    return max(1, min(wanted, int(budget // (per_sample * BACKWARD_FACTOR))))


class _Outputs:
    """The outputs of ``modules``, as their forward hooks see them, in call order."""

    def __init__(self, modules):
        self.seen = []
        self.handles = [m.register_forward_hook(self._keep) for m in modules]

    def _keep(self, module, args, output):
        self.seen.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list:
        seen, self.seen = self.seen, []
        return seen

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def real_tokens(x, mask):
    """``x``'s rows as ``[tokens, width]``: where ``mask`` (batch x sequence) fits ``x``,
    only the positions it marks real (padding is no part of what a model answers)."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _mse(output, target, mask):
    """Mean squared error; over a sequence's real tokens only where ``mask`` marks them
    (what padding positions hold is no part of the model's answer)."""
    import torch.nn.functional as F

    if mask is None or output.ndim != 3 or output.shape[:2] != mask.shape:
        return F.mse_loss(output, target)
    weights = mask.to(output.dtype).unsqueeze(-1)
    return ((output - target).pow(2) * weights).sum() / (weights.sum() * output.shape[-1]).clamp(min=1)


def _relative_mse(output, target, mask):
    """The mean squared error as a share of the target's own mean square."""
    return _mse(output, target, mask) / _mse(target, 0 * target, mask).clamp(min=1e-8)


def _without_padding_columns(rows: list, mask, mask_at: int):
    """The batch without the trailing positions that are padding in every row: data
    files pad every sequence to the longest in the file, and a batch of short sentences
    would otherwise pay for the longest one in every step."""
    real = mask.shape[1] - int((mask.flip(1).cumsum(1) == 0).all(0).sum())
    if real in (0, mask.shape[1]):
        return rows, mask
    length = mask.shape[1]
    rows = [r[:, :real] if r.ndim >= 2 and r.shape[1] == length else r for r in rows]
    return rows, rows[mask_at]


def distill(student, teacher, inputs: dict, steps: int, learning_rate: float, batch_size: int = 64,
            max_seconds: float = 0.0, context=None, activity: str = "distillation", matched=(),
            after_step=None, min_steps: int = MIN_STEPS) -> dict:
    """Fit the student to the teacher's outputs: soft targets (temperature 2) for
    classifier logits, mean squared error otherwise (over real tokens only, where an
    ``attention_mask`` input marks them). ``matched`` pairs (student block, teacher
    block) whose outputs are fitted too, each pair's error added to the loss: a student
    as deep and wide in its hidden states as its teacher learns from every block.
    ``after_step`` is called after every update (to hold a constraint, such as zeros).

    Bounded twice: by wall-clock (``max_seconds``, 0 for the automatic budget; but never
    fewer than ``min_steps`` steps, so that a busy host trains as far as an idle one) and by
    memory (the batch shrinks until the activations fit the worker's share). Reports its
    progress through ``context``. Returns what to record: the last loss, the steps run of
    those planned, the batch size, and why it stopped early if it did."""
    import torch
    import torch.nn.functional as F

    arrays = [torch.from_numpy(a) for a in inputs.values()]
    mask_at = list(inputs).index(MASK) if MASK in inputs else None
    total = len(arrays[0])
    parameters = sum(p.numel() for p in student.parameters())
    budget = time_budget(max_seconds, parameters)
    student.train()
    teacher.eval()
    per_sample = activation_bytes_per_sample(student, arrays)
    batch = fit_batch_size(min(batch_size, total), per_sample, getattr(context, "worker_memory_mb", 0))
    optimizer = torch.optim.Adam(student.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    started = time.monotonic()
    deadline = started + budget
    loss_value = float("nan")
    done = 0
    stopped = None
    students, teachers = _Outputs([s for s, _ in matched]), _Outputs([t for _, t in matched])
    for done in range(1, steps + 1):
        idx = torch.randint(0, total, (batch,), generator=generator)
        rows = [a[idx] for a in arrays]
        mask = None
        if mask_at is not None:
            rows, mask = _without_padding_columns(rows, rows[mask_at], mask_at)
        with torch.no_grad():
            target = teacher(*rows)
        output = student(*rows)
        blocks = list(zip(students.take(), teachers.take()))
        if output.ndim == 2 and output.shape[1] > 1:
            temperature = 2.0
            loss = F.kl_div(F.log_softmax(output / temperature, -1), F.softmax(target / temperature, -1),
                            reduction="batchmean") * temperature ** 2
            if blocks:
                loss = loss + sum(_relative_mse(got, wanted, mask) for got, wanted in blocks) / len(blocks)
        elif blocks:
            # Relative errors: blocks whose hidden states are large (BERT's outlier
            # dimensions) must not drown the others, nor the output the user sees.
            pairs = [(output, target), *blocks]
            loss = sum(_relative_mse(got, wanted, mask) for got, wanted in pairs) / len(pairs)
        else:
            loss = _mse(output, target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_value = float(loss.detach())
        now = time.monotonic()
        per_step = (now - started) / done
        if context is not None:
            context.progress(activity, done, steps, loss=loss_value, budget_seconds=round(budget),
                             eta_seconds=min(deadline - now, per_step * (steps - done)))
        if now > deadline and min_steps <= done < steps:
            stopped = f"time budget of {budget:.0f} s reached after {done} of {steps} steps"
            if done == min_steps and now > deadline + per_step:
                stopped += f" (it ran {min_steps} steps, its floor, {now - deadline:.0f} s past the budget)"
            break
    students.close()
    teachers.close()
    student.eval()
    return {"loss": loss_value, "steps": done, "steps_planned": steps, "batch_size": batch,
            "activation_mib_per_sample": round(per_sample / 2**20, 3), "time_budget_seconds": round(budget, 1),
            "stopped": stopped}


def budget_params(what: str) -> tuple[Param, Param]:
    """The ``max_seconds`` and ``min_steps`` parameters of a step that trains (``what``
    it trains): it stops at whichever comes later."""
    return (Param("max_seconds", float, 0.0, f"time budget of the {what}; 0: a minute plus a second per 2M "
                                             "parameters, at most 15 min"),
            Param("min_steps", int, MIN_STEPS, f"steps of the {what} run even past its time budget"))


def budget_of(params: dict) -> dict:
    """What ``distill`` takes of a step's ``budget_params``."""
    return {"max_seconds": params["max_seconds"], "min_steps": params.get("min_steps", MIN_STEPS)}


class TrainingStep(Step):
    """A step that builds a smaller model and trains it: planned by its time budget."""

    forms = {"onnxruntime": TORCH, "torch": TORCH}

    def expected_seconds(self, params, baseline_seconds, size_bytes):
        if not self.trains(params):
            return baseline_seconds
        return baseline_seconds + expected_training_seconds(params["max_seconds"], size_bytes)

    def trains(self, params):
        return params.get("recovery_steps") != 0  # a step whose training is optional, turned off

    def check_shares(self, **shares: float) -> None:
        """Each share (of units, heads, channels removed) must be in [0, 1)."""
        for key, value in shares.items():
            if not 0 <= value < 1:
                raise StepNotApplicable(f"{self.name}: {key} must be in [0, 1), got {value}")


def example_inputs(model, context, rows: int = 2) -> tuple:
    """The first ``rows`` sample inputs as tensors, in the model's input order."""
    import torch

    return tuple(torch.from_numpy(context.sample_inputs[spec.name][:rows]) for spec in model.inputs)
