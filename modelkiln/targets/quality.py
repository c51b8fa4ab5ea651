"""Quality: a task metric on eval data where the checkpoint ships it, else fidelity to
the original model's outputs on sample inputs.

An encoder's hidden states are compared the way its users read them: mean-pooled over
the tokens its attention mask keeps (padding excluded), one cosine per sample
(``pooled_cosine``); a variant that mishandles padding or the mask shows there.

A causal language model's forward pass over a prompt gives, at every position, the
logits of the next token given the true prefix (teacher forcing). Its fidelity is the
share of positions whose most likely next token is the original's (``next_token_top1``),
with the mean KL divergence from the original's next-token distribution reported beside
it. Comparing free-running generations instead would let one early near-tie (common
in bf16) make every later token differ, which says little about the variant. When the
checkpoint ships its own data (text), the samples are real text and a trained model has
many near-ties there too: it is judged by how well it predicts that text, the original's
perplexity over the variant's (``perplexity_ratio``: 1.0 for the original, below when
worse; a 1 % drop is about a 1 % higher perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCURACY = "accuracy"
TOP1_AGREEMENT = "top1_agreement"
COSINE = "cosine"
NEXT_TOKEN_TOP1 = "next_token_top1"
PERPLEXITY_RATIO = "perplexity_ratio"
POOLED_COSINE = "pooled_cosine"


def is_classifier_output(outputs: np.ndarray) -> bool:
    return outputs.ndim == 2 and outputs.shape[1] > 1


def choose_metric(reference: np.ndarray, labels: np.ndarray | None, causal_lm: bool = False,
                  masked: bool = False, real_data: bool = False) -> str:
    if causal_lm and reference.ndim == 3:
        return PERPLEXITY_RATIO if real_data else NEXT_TOKEN_TOP1
    if labels is not None and labels.dtype.kind in "iu" and labels.ndim == 1 and is_classifier_output(reference):
        return ACCURACY
    if is_classifier_output(reference):
        return TOP1_AGREEMENT
    if masked and reference.ndim == 3:
        return POOLED_COSINE
    return COSINE


def pooled(outputs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the positions ``mask`` keeps: [rows, positions, width] -> [rows, width]."""
    keep = mask.astype(np.float64)[..., None]
    return (outputs.astype(np.float64) * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1.0)


def row_cosines(metric: str, outputs: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """One cosine similarity per sample: of the pooled embeddings for ``pooled_cosine``,
    of the whole flattened output otherwise."""
    if metric == POOLED_COSINE:
        a, b = pooled(outputs, mask), pooled(reference, mask)
    else:
        a = outputs.reshape(len(outputs), -1).astype(np.float64)
        b = reference.reshape(len(reference), -1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cosines = np.sum(a * b, axis=1) / np.maximum(norm_a * norm_b, 1e-30)
    # Two zero vectors agree; a zero, infinite or NaN output against anything else does not.
    cosines = np.where((norm_a > 0) & (norm_b > 0), cosines, np.where((norm_a == 0) & (norm_b == 0), 1.0, 0.0))
    return np.where(_finite_rows(a) & np.isfinite(cosines), cosines, 0.0)


def _finite_rows(outputs: np.ndarray) -> np.ndarray:
    return np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)


def degenerate_reason(outputs: np.ndarray, reference: np.ndarray) -> str | None:
    """Why a variant's outputs cannot be the model's, whatever a metric says: NaN or
    infinite values, or one output for every sample where the original's differ."""
    bad = int((~_finite_rows(outputs)).sum())
    if bad:
        return f"NaN or infinite outputs on {bad} of {len(outputs)} samples"
    flat, expected = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    if len(flat) > 1 and np.ptp(flat, axis=0).max() == 0 and np.ptp(expected, axis=0).max() > 0:
        return f"the same output for all {len(outputs)} samples, where the original's differ"
    return None


def score(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
          mask: np.ndarray | None = None, ids: np.ndarray | None = None) -> float:
    """``ids``: the token ids the outputs predict, for ``perplexity_ratio``."""
    if outputs.shape != reference.shape:
        raise ValueError(f"output shape {outputs.shape} differs from the original's {reference.shape}")
    if metric == PERPLEXITY_RATIO:
        return perplexity_ratio(perplexity(reference, ids), perplexity(outputs, ids))
    finite = _finite_rows(outputs)  # a row with NaN or infinite outputs is wrong, whatever its argmax
    if metric == ACCURACY:
        return float(np.mean((outputs.argmax(axis=-1) == labels) & finite))
    if metric in (TOP1_AGREEMENT, NEXT_TOKEN_TOP1):  # for logits [rows, positions, vocab]: every position
        agree = outputs.argmax(axis=-1) == reference.argmax(axis=-1)
        return float(np.mean(agree & finite.reshape((-1,) + (1,) * (agree.ndim - 1))))
    return float(np.mean(row_cosines(metric, outputs, reference, mask)))


def delta_standard_error(metric: str, outputs: np.ndarray, reference: np.ndarray,
                         labels: np.ndarray | None) -> float | None:
    """For a score that counts right answers (accuracy, top-1 agreement): the standard
    error of the quality delta, from the per-sample differences between the variant and
    the original on the same samples. It says how far the samples can tell: on 300 rows
    where the two disagree on one in ten, about 0.018, larger than a 1 % gate's step.
    None for other metrics or fewer than two samples."""
    if metric not in (ACCURACY, TOP1_AGREEMENT) or len(outputs) < 2 or outputs.ndim != 2:
        return None
    finite = _finite_rows(outputs)
    if metric == ACCURACY:
        right = (outputs.argmax(axis=-1) == labels) & finite
        original = reference.argmax(axis=-1) == labels
    else:
        right = (outputs.argmax(axis=-1) == reference.argmax(axis=-1)) & finite
        original = np.ones_like(right)
    differences = right.astype(np.float64) - original.astype(np.float64)
    return float(differences.std(ddof=1) / np.sqrt(len(differences)))


def next_token_kl(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean over positions of KL(original || variant) of the next-token distributions, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p_log, q_log = log_softmax(reference), log_softmax(outputs)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of each next token of ``ids`` under the
    ``logits`` at the position before it ([rows, positions, vocab], teacher-forced). One
    row at a time: a large vocabulary's log-probabilities for every row at once would
    take gigabytes."""
    total, count = 0.0, 0
    for row_logits, row_ids in zip(logits, ids):
        x = row_logits[:-1].astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        total -= float(np.take_along_axis(log_probs, row_ids[1:, None].astype(np.int64), axis=-1).sum())
        count += len(row_ids) - 1
    return float(np.exp(total / count))


def perplexity_ratio(baseline_perplexity: float, variant_perplexity: float) -> float:
    """The ``perplexity_ratio`` quality: 1.0 for the original, below when worse (0.0 when
    the variant's perplexity is not a number: NaN or infinite logits)."""
    ratio = baseline_perplexity / variant_perplexity
    return float(ratio) if np.isfinite(ratio) else 0.0


def relative_drop(quality: float, baseline: float) -> float:
    """How much worse than the baseline, as a fraction of it (negative: better)."""
    if baseline == 0:
        return -quality
    return (baseline - quality) / abs(baseline)


# Float noise in a score must not turn an identical model into a rejected one.
EPSILON = 1e-9


def within_drop(quality: float, baseline: float, max_drop: float) -> bool:
    """Whether ``quality`` is at most ``max_drop`` (relative) below ``baseline``."""
    return relative_drop(quality, baseline) <= max_drop + EPSILON


class Gate:
    """The quality gate a variant meets (``plugins.api.QualityGate``): its outputs on the
    sample inputs scored against the original's, within ``max_drop`` of the baseline."""

    def __init__(self, metric: str, reference: np.ndarray, labels: np.ndarray | None,
                 baseline_quality: float, max_drop: float, mask: np.ndarray | None = None,
                 ids: np.ndarray | None = None):
        self.metric = metric
        self.reference = np.asarray(reference, dtype=np.float32)
        self.labels = labels
        self.mask = mask
        self.ids = ids
        self.baseline_quality = baseline_quality
        self.max_drop = max_drop

    def score(self, outputs) -> float:
        return score(self.metric, np.asarray(outputs, dtype=np.float32), self.reference, self.labels, self.mask,
                     self.ids)

    def passes(self, quality: float) -> bool:
        return within_drop(quality, self.baseline_quality, self.max_drop)


@dataclass(frozen=True)
class GateLimits:
    """What the gate allows (``[policy]`` keys of the same names)."""

    max_quality_drop: float = 0.01
    max_sample_drop: float = 0.05
    min_batch_agreement: float = 0.999

    @classmethod
    def of(cls, policy) -> "GateLimits":
        return cls(policy.max_quality_drop, policy.max_sample_drop, policy.min_batch_agreement)


def gate_reason(quality: float, baseline: float, metric: str, checks: dict | None = None,
                limits: GateLimits = GateLimits()) -> str | None:
    """Why a variant misses the gate (None: it passes), in the words `kiln variants`
    shows: its quality on the samples, its worst sample (``checks.min_cosine``), and
    whether a sample's answer changes with its batch (``checks.padded_vs_alone_min_cosine``)."""
    checks = checks or {}
    reasons = []
    if not within_drop(quality, baseline, limits.max_quality_drop):
        reasons.append(f"{metric} {quality:.4f} is {relative_drop(quality, baseline):.2%} below the original's "
                       f"{baseline:.4f}; policy.max_quality_drop allows {limits.max_quality_drop:.2%}")
    worst = checks.get("min_cosine")
    if worst is not None and not within_drop(worst, baseline, limits.max_sample_drop):
        reasons.append(f"its worst sample's cosine {worst:.4f} is {relative_drop(worst, baseline):.2%} below the "
                       f"original's {baseline:.4f}; policy.max_sample_drop allows {limits.max_sample_drop:.2%}")
    agreement = checks.get("padded_vs_alone_min_cosine")
    if agreement is not None and agreement < limits.min_batch_agreement - EPSILON:
        reasons.append(f"a sample alone and in a padded batch agree only to cosine {agreement:.4f} (its answer "
                       f"depends on its batch); policy.min_batch_agreement asks {limits.min_batch_agreement:.4f}")
    return "quality gate not met: " + "; ".join(reasons) if reasons else None
