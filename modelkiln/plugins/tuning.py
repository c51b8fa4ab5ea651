"""Accuracy-aware tuning: keep the layers quantization hurts most in float until the
quality gate passes, as Intel Neural Compressor's accuracy-aware tuning does.

Trained models are not random ones: a few activation outlier channels can make one
layer's int8 version wreck the whole model while every other layer quantizes cleanly.
So a candidate that misses the gate is not given up on: each layer's sensitivity is
measured by quantizing it alone, and the most sensitive layers are kept in float, one,
then two, then four..., until a candidate passes or the trial budget is spent.
"""

from __future__ import annotations

from typing import Any, Callable


def tune(build: Callable[[frozenset, str | None], Any], evaluate: Callable[[Any], float],
         layers: list[str], context, budget: int) -> tuple[Any, dict]:
    """Find a candidate that passes ``context.passes``.

    :param build: ``build(excluded, only)`` quantizes every layer but ``excluded``, or only
        the layer ``only`` when it is given, and returns the candidate.
    :param evaluate: the candidate's quality, scored as the gate scores it.
    :param layers: the quantizable layers, largest first (probed in that order).
    :param budget: the most candidates built after the first.
    :returns: the first passing candidate, else the best one, and a record for the lineage.
    """
    trials = []

    def trial(excluded=(), only=None):
        candidate = build(frozenset(excluded), only)
        quality = evaluate(candidate)
        trials.append({"excluded": list(excluded), "only": only, "quality": quality})
        return candidate, quality

    candidate, quality = trial()
    if context.passes(quality):
        return candidate, {"tuning": "not needed", "quality": quality}
    best = (quality, candidate, [])
    # Sensitivity: the quality lost when a layer alone is quantized.
    probes = layers[: max(1, budget // 2)]
    lost = {}
    for name in probes:
        _, alone = trial(only=name)
        lost[name] = context.baseline_quality - alone
    order = sorted(probes, key=lambda name: -lost[name])
    keep_float = 1
    # At least one layer stays quantized, or the "variant" would be the baseline again.
    while len(trials) <= budget and keep_float < len(layers):
        excluded = order[:keep_float]
        candidate, quality = trial(excluded)
        if quality > best[0]:
            best = (quality, candidate, excluded)
        if context.passes(quality):
            return candidate, {"tuning": "passed", "kept_in_float": excluded, "quality": quality,
                               "sensitivity": {k: lost[k] for k in order}, "trials": len(trials)}
        if keep_float >= len(order):
            break
        keep_float *= 2
    quality, candidate, excluded = best
    return candidate, {"tuning": "gate not met", "kept_in_float": excluded, "quality": quality,
                       "sensitivity": {k: lost[k] for k in order}, "trials": len(trials)}
