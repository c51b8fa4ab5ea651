"""Knowledge distillation, shared by the steps that train a smaller model from the original."""

from __future__ import annotations

import time


def training_data(context) -> tuple[dict, str]:
    """Unlabelled inputs to train on, and where they came from.

    train.npz first, then calibration.npz, then the sample inputs, which are the eval
    inputs when the checkpoint ships eval.npz: used without labels, but the quality
    score measured on them afterwards is then optimistic, so the source is recorded.
    """
    if context.training_inputs is not None:
        return context.training_inputs, "train.npz"
    if context.calibration_inputs is not None:
        return context.calibration_inputs, "calibration.npz"
    return context.sample_inputs, "sample inputs"


# A training step's time budget when its recipe sets none (max_seconds = 0): a minute,
# plus a second per two million parameters, at most 15 minutes. Recovery from pruning or
# depth distillation goes on improving for hours; what it buys per minute falls fast, and
# every other recipe of the checkpoint waits behind it.
AUTO_BASE_SECONDS = 60.0
AUTO_SECONDS_PER_PARAMETER = 0.5e-6
AUTO_MOST_SECONDS = 900.0
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


def distill(student, teacher, inputs: dict, steps: int, learning_rate: float, batch_size: int = 64,
            max_seconds: float = 0.0, context=None, activity: str = "distillation") -> dict:
    """Fit the student to the teacher's outputs: soft targets (temperature 2) for
    classifier logits, mean squared error otherwise.

    Bounded twice: by wall-clock (``max_seconds``, 0 for the automatic budget) and by
    memory (the batch shrinks until the activations fit the worker's share). Reports its
    progress through ``context``. Returns what to record: the last loss, the steps run of
    those planned, the batch size, and why it stopped early if it did."""
    import torch
    import torch.nn.functional as F

    arrays = [torch.from_numpy(a) for a in inputs.values()]
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
    for done in range(1, steps + 1):
        idx = torch.randint(0, total, (batch,), generator=generator)
        rows = [a[idx] for a in arrays]
        with torch.no_grad():
            target = teacher(*rows)
        output = student(*rows)
        if output.ndim == 2 and output.shape[1] > 1:
            temperature = 2.0
            loss = F.kl_div(F.log_softmax(output / temperature, -1), F.softmax(target / temperature, -1),
                            reduction="batchmean") * temperature ** 2
        else:
            loss = F.mse_loss(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        now = time.monotonic()
        per_step = (now - started) / done
        if context is not None:
            context.progress(activity, done, steps, loss=loss_value, budget_seconds=round(budget),
                             eta_seconds=min(deadline - now, per_step * (steps - done)))
        if now > deadline and done < steps:
            stopped = f"time budget of {budget:.0f} s reached after {done} of {steps} steps"
            break
    student.eval()
    return {"loss": loss_value, "steps": done, "steps_planned": steps, "batch_size": batch,
            "activation_mib_per_sample": round(per_sample / 2**20, 3), "time_budget_seconds": round(budget, 1),
            "stopped": stopped}
