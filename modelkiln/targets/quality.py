"""Quality: a task metric on eval data where the checkpoint ships it, else fidelity to
the original model's outputs on sample inputs."""

from __future__ import annotations

import numpy as np

ACCURACY = "accuracy"
TOP1_AGREEMENT = "top1_agreement"
COSINE = "cosine"


def is_classifier_output(outputs: np.ndarray) -> bool:
    return outputs.ndim == 2 and outputs.shape[1] > 1


def choose_metric(reference: np.ndarray, labels: np.ndarray | None) -> str:
    if labels is not None and labels.dtype.kind in "iu" and labels.ndim == 1 and is_classifier_output(reference):
        return ACCURACY
    if is_classifier_output(reference):
        return TOP1_AGREEMENT
    return COSINE


def score(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    if outputs.shape != reference.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the original's {reference.shape}")
    if metric == ACCURACY:
        return float(np.mean(outputs.argmax(axis=-1) == labels))
    if metric == TOP1_AGREEMENT:
        return float(np.mean(outputs.argmax(axis=-1) == reference.argmax(axis=-1)))
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30), 1.0)
    return float(np.mean(cos))


def relative_drop(quality: float, baseline: float) -> float:
    """How much worse than the baseline, as a fraction of it (negative: better)."""
    if baseline == 0:
        return -quality
    return (baseline - quality) / abs(baseline)
