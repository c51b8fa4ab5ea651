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


def distill(student, teacher, inputs: dict, steps: int, learning_rate: float, batch_size: int = 64,
            max_seconds: float | None = None) -> float:
    """Fit the student to the teacher's outputs: soft targets (temperature 2) for
    classifier logits, mean squared error otherwise. Returns the last batch's loss."""
    import torch
    import torch.nn.functional as F

    arrays = [torch.from_numpy(a) for a in inputs.values()]
    total = len(arrays[0])
    optimizer = torch.optim.Adam(student.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + max_seconds if max_seconds else None
    student.train()
    teacher.eval()
    loss_value = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, total, (min(batch_size, total),), generator=generator)
        batch = [a[idx] for a in arrays]
        with torch.no_grad():
            target = teacher(*batch)
        output = student(*batch)
        if output.ndim == 2 and output.shape[1] > 1:
            temperature = 2.0
            loss = F.kl_div(F.log_softmax(output / temperature, -1), F.softmax(target / temperature, -1),
                            reduction="batchmean") * temperature ** 2
        else:
            loss = F.mse_loss(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss)
        if deadline is not None and time.monotonic() > deadline:
            break
    student.eval()
    return loss_value
