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


def _needed(array: np.ndarray | None, what: str, metric: str) -> np.ndarray:
    """The attention mask or token ids that ``metric`` cannot be computed without."""
    if array is None:
        raise ValueError(f"{metric} needs the samples' {what}, and none were given")
    return array


def row_cosines(metric: str, outputs: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """One cosine similarity per sample: of the pooled embeddings for ``pooled_cosine``,
    of the whole flattened output otherwise."""
    if metric == POOLED_COSINE:
        keep = _needed(mask, "attention mask", metric)
        a, b = pooled(outputs, keep), pooled(reference, keep)
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
        tokens = _needed(ids, "token ids", metric)
        return perplexity_ratio(perplexity(reference, tokens), perplexity(outputs, tokens))
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


def row_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the negative log-likelihood of each next token of ``ids`` under the
    ``logits`` at the position before it ([rows, positions, vocab], teacher-forced),
    summed, and the tokens counted. One row at a time: a large vocabulary's
    log-probabilities for every row at once would take gigabytes."""
    totals, counts = np.zeros(len(logits)), np.zeros(len(logits))
    for row, (row_logits, row_ids) in enumerate(zip(logits, ids)):
        x = row_logits[:-1].astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        totals[row] = -float(np.take_along_axis(log_probs, row_ids[1:, None].astype(np.int64), axis=-1).sum())
        counts[row] = len(row_ids) - 1
    return totals, counts


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of each next token of ``ids`` (``row_nll``)."""
    totals, counts = row_nll(logits, ids)
    return float(np.exp(totals.sum() / counts.sum()))


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


# Confidence levels at which the drop's upper bound is recorded: the policy reads the
# smallest recorded level at or above its ``confidence``.
BOUND_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.975, 0.99)
# Bootstrap resamples of the samples: the bound moves by well under a tenth of a point
# between seeds at this count.
RESAMPLES = 1000


def _row_terms(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
               mask: np.ndarray | None, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample, what the metric sums: the variant's part, the original's part and the
    weight (positions), so that over any set of samples the score is sum(variant) /
    sum(weight) and the original's sum(original) / sum(weight). For ``perplexity_ratio``
    the parts are negative log-likelihoods and the weight the tokens predicted."""
    rows = len(outputs)
    finite = _finite_rows(outputs)
    if metric == PERPLEXITY_RATIO:
        tokens = _needed(ids, "token ids", metric)
        variant, counts = row_nll(outputs, tokens)
        original, _ = row_nll(reference, tokens)
        return np.where(finite & np.isfinite(variant), variant, 1e30), original, counts  # a broken row: no likelihood
    if metric == ACCURACY:
        right = (outputs.argmax(axis=-1) == labels) & finite
        return right.astype(np.float64), (reference.argmax(axis=-1) == labels).astype(np.float64), np.ones(rows)
    if metric in (TOP1_AGREEMENT, NEXT_TOKEN_TOP1):
        agree = (outputs.argmax(axis=-1) == reference.argmax(axis=-1)).reshape(rows, -1)
        agree = agree & finite[:, None]
        positions = np.full(rows, float(agree.shape[1]))
        return agree.sum(axis=1).astype(np.float64), positions, positions
    return row_cosines(metric, outputs, reference, mask), np.ones(rows), np.ones(rows)


def _drops(metric: str, variant: np.ndarray, original: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The relative drop for each row of sums (``_row_terms`` summed over a resample)."""
    if metric == PERPLEXITY_RATIO:
        with np.errstate(over="ignore", invalid="ignore"):
            ratio = np.exp((original - variant) / np.maximum(weight, 1.0))
        return 1.0 - np.where(np.isfinite(ratio), ratio, 0.0)
    return (original - variant) / np.maximum(np.abs(original), 1e-12)


def drop_bounds(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None,
                mask: np.ndarray | None = None, ids: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """How large the quality drop may really be, from the paired per-sample differences:
    for each of BOUND_LEVELS, that quantile of the drop over bootstrap resamples of the
    samples (the variant and the original scored on the same resample). Where every
    sample agrees the bound is the drop itself; where a few samples carry a mean, the
    bound says how far a mean of that few can be trusted. Keys are the levels as text
    (``"0.95"``), values relative drops (0.01 = 1 %)."""
    return _bounds(metric, *_row_terms(metric, outputs, reference, labels, mask, ids), seed=seed)


def _bounds(metric: str, variant: np.ndarray, original: np.ndarray, weight: np.ndarray, seed: int = 0) -> dict:
    """``drop_bounds`` from per-sample terms (``_row_terms``)."""
    rows = len(variant)
    if rows == 0:
        return {}
    counts = np.random.default_rng(seed).multinomial(rows, np.full(rows, 1.0 / rows), size=RESAMPLES)
    counts = counts.astype(np.float64)
    with np.errstate(invalid="ignore"):
        drops = _drops(metric, counts @ variant, counts @ original, counts @ weight)
    return {f"{level:g}": float(np.quantile(drops, level)) for level in BOUND_LEVELS}


def bound_at(bounds: dict | None, confidence: float) -> tuple[float, float] | None:
    """The recorded bound at the smallest level at or above ``confidence``, with that
    level (None when nothing recorded reaches it)."""
    levels = sorted((float(level), value) for level, value in (bounds or {}).items())
    return next(((level, value) for level, value in levels if level >= confidence - EPSILON), None)


def probe_metric(reference: np.ndarray, causal_lm: bool, masked: bool) -> str:
    """How outputs on the probe set (text with no labels) are compared: as the samples'
    fidelity metric is, a causal LM's by how well it predicts the text."""
    return choose_metric(reference, None, causal_lm, masked, real_data=True)


def probe_summary(metric: str, outputs: np.ndarray, mask: np.ndarray | None, ids: np.ndarray | None) -> np.ndarray:
    """What of a model's outputs on the probe set is kept to compare with: the pooled
    embeddings for ``pooled_cosine``, each row's negative log-likelihood and token count
    for ``perplexity_ratio`` (a vocabulary's logits at every position would take
    gigabytes), the outputs themselves otherwise."""
    if metric == POOLED_COSINE:
        return pooled(outputs, _needed(mask, "attention mask", metric)).astype(np.float32)
    if metric == PERPLEXITY_RATIO:
        return np.stack(row_nll(outputs, _needed(ids, "token ids", metric)), axis=1)
    return outputs.astype(np.float32)


def probe_checks(metric: str, summary: np.ndarray, reference: np.ndarray) -> dict:
    """The probe figures a measurement records (``checks.probe_*``): the variant's score
    on the probe set, the original's, the worst row (cosine metrics) and the drop's
    bounds (``drop_bounds``). ``summary`` and ``reference`` are ``probe_summary``s."""
    checks: dict = {"probe_metric": metric, "probe_rows": int(len(reference))}
    if metric == PERPLEXITY_RATIO:
        variant = np.where(np.isfinite(summary[:, 0]), summary[:, 0], 1e30)
        original, counts = reference[:, 0], reference[:, 1]
        checks["probe_quality"] = perplexity_ratio(float(np.exp(original.sum() / counts.sum())),
                                                   float(np.exp(min(variant.sum() / counts.sum(), 700.0))))
        checks["probe_baseline_quality"] = 1.0
        checks["probe_drop_bounds"] = _bounds(metric, variant, original, counts)
        return checks
    compared = COSINE if metric == POOLED_COSINE else metric
    checks["probe_quality"] = score(compared, summary, reference, None)
    checks["probe_baseline_quality"] = score(compared, reference, reference, None)
    if compared == COSINE:
        checks["probe_min_cosine"] = float(row_cosines(COSINE, summary, reference).min())
    checks["probe_drop_bounds"] = drop_bounds(compared, summary, reference)
    return checks


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
    # The drop's upper bound at this confidence must be within max_quality_drop too (0: the
    # mean alone decides).
    confidence: float = 0.95
    # Distinct rows a variant that trained on the checkpoint's data must be judged on,
    # none of which it saw (0: no such rule).
    min_heldout_rows: int = 64

    @classmethod
    def of(cls, policy) -> "GateLimits":
        return cls(policy.max_quality_drop, policy.max_sample_drop, policy.min_batch_agreement, policy.confidence,
                   policy.min_heldout_rows)


def gate_reason(quality: float, baseline: float, metric: str, checks: dict | None = None,
                limits: GateLimits = GateLimits(), lineage: list | None = None) -> str | None:
    """Why a variant misses the gate (None: it passes), in the words `kiln variants`
    shows. The one judgement of the gate: the pipeline records it as a report, the policy
    decides by it. It reads the quality on the samples and the upper bound of its drop
    (``checks.quality_drop_bounds``), the worst sample (``checks.min_cosine``), whether a
    sample's answer changes with its batch (``checks.padded_vs_alone_min_cosine``), the
    same on the probe set (``checks.probe_*``), and for a variant whose steps trained on
    the checkpoint's data (``lineage``), whether enough rows it never saw judged it."""
    checks = checks or {}
    reasons = []
    if not within_drop(quality, baseline, limits.max_quality_drop):
        reasons.append(f"{metric} {quality:.4f} is {relative_drop(quality, baseline):.2%} below the original's "
                       f"{baseline:.4f}; policy.max_quality_drop allows {limits.max_quality_drop:.2%}")
    else:
        reasons += _bound_reasons(checks.get("quality_drop_bounds"), checks.get("samples"), "samples", limits)
    worst = checks.get("min_cosine")
    if worst is not None and not within_drop(worst, baseline, limits.max_sample_drop):
        reasons.append(f"its worst sample's cosine {worst:.4f} is {relative_drop(worst, baseline):.2%} below the "
                       f"original's {baseline:.4f}; policy.max_sample_drop allows {limits.max_sample_drop:.2%}")
    agreement = checks.get("padded_vs_alone_min_cosine")
    if agreement is not None and agreement < limits.min_batch_agreement - EPSILON:
        reasons.append(f"a sample alone and in a padded batch agree only to cosine {agreement:.4f} (its answer "
                       f"depends on its batch); policy.min_batch_agreement asks {limits.min_batch_agreement:.4f}")
    reasons += _probe_reasons(checks, limits)
    heldout = heldout_reason(lineage, limits.min_heldout_rows)
    if heldout is not None:
        reasons.append(heldout)
    if not reasons:
        return None
    return "quality gate not met: " + "; ".join(reasons) + _cut_short(lineage)


def _cut_short(lineage: list | None) -> str:
    """Where a training step stopped at its time budget, say so: a variant that missed
    the gate after a fraction of its steps may pass with a larger ``max_seconds``."""
    for entry in lineage or []:
        stopped = next((value for key, value in (entry.get("record") or {}).items()
                        if key.endswith("_stopped") and value), None)
        if stopped:
            return (f" ({entry.get('step', 'a step')}'s training stopped early: {stopped}; a larger max_seconds "
                    "in the recipe trains it further)")
    return ""


def _bound_reasons(bounds: dict | None, rows, what: str, limits: GateLimits) -> list[str]:
    if limits.confidence <= 0:
        return []
    found = bound_at(bounds, limits.confidence)
    if found is None or found[1] <= limits.max_quality_drop + EPSILON:
        return []
    level, bound = found
    count = f"{rows} " if rows else ""
    return [f"on its {count}{what} the drop could be as large as {bound:.2%} (upper bound at {level:.1%} "
            f"confidence), over policy.max_quality_drop's {limits.max_quality_drop:.2%}: too few or too "
            "unlike samples to vouch for it (more eval rows narrow the bound; policy.confidence = 0 judges "
            "the mean alone)"]


def _probe_reasons(checks: dict, limits: GateLimits) -> list[str]:
    """The gate on modelkiln's own probe set (``probes``): text the variant never saw
    and its data may not be like."""
    if checks.get("probe_error"):
        return [f"it fails on modelkiln's probe sentences, which the original answers ({checks['probe_error']})"]
    quality, baseline = checks.get("probe_quality"), checks.get("probe_baseline_quality")
    if quality is None or baseline is None:
        return []
    metric = checks.get("probe_metric", "quality")
    if not within_drop(quality, baseline, limits.max_quality_drop):
        reasons = [f"on modelkiln's {checks.get('probe_rows', '')} probe sentences its {metric} {quality:.4f} is "
                   f"{relative_drop(quality, baseline):.2%} below the original's {baseline:.4f}; "
                   f"policy.max_quality_drop allows {limits.max_quality_drop:.2%}"]
    else:
        reasons = _bound_reasons(checks.get("probe_drop_bounds"), checks.get("probe_rows"), "probe sentences",
                                 limits)
    worst = checks.get("probe_min_cosine")
    if worst is not None and not within_drop(worst, baseline, limits.max_sample_drop):
        reasons.append(f"its worst probe sentence's cosine {worst:.4f} is {relative_drop(worst, baseline):.2%} "
                       f"below the original's; policy.max_sample_drop allows {limits.max_sample_drop:.2%}")
    return reasons


def _to_ship(kind: str, source: str) -> str:
    """The data file of ``kind`` (eval, train) in the form the checkpoint ships its data."""
    if source.endswith(".jsonl"):
        return f"{kind}.jsonl"
    if source.endswith(".npz"):
        return f"{kind}.npz"
    return f"{kind}.jsonl (text) or {kind}.npz"


def heldout_reason(lineage: list | None, min_rows: int) -> str | None:
    """Why a variant that trained on the checkpoint's data cannot be promoted on its
    score (None: it can, or it trained on nothing): it trained on its own quality
    samples, or fewer than ``min_rows`` distinct rows it never saw judged it."""
    for entry in lineage or []:
        data = entry.get("data")
        if not data or min_rows <= 0:
            continue
        step, source = entry.get("step", "a step"), data.get("quality_source", "")
        if data.get("trained_on_samples"):
            judge = (f", and {_to_ship('eval', source)} with at least {min_rows} distinct rows to judge it"
                     if data.get("quality_rows", 0) < min_rows else "")
            return (f"{step} trained on its own quality samples ({source} left no other rows to train on), so "
                    f"their score cannot vouch for it: ship {_to_ship('train', source)} with rows to train on"
                    + judge)
        if data.get("heldout_rows", 0) < min_rows:
            return (f"{step} trained on the checkpoint's data, and only {data.get('heldout_rows', 0)} distinct rows "
                    f"it never saw judge it (policy.min_heldout_rows asks {min_rows}): ship "
                    f"{_to_ship('eval', source)} with at least {min_rows} distinct rows, none of them among the rows "
                    "it trains on")
    return None
