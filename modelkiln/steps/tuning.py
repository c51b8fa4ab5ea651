"""Accuracy-aware tuning: keep the layers quantization hurts most in float until the
quality gate passes, as Intel Neural Compressor's accuracy-aware tuning does.

Trained models are not random ones: a few activation outlier channels can make one
layer's int8 version wreck the whole model while every other layer quantizes cleanly.
So a candidate that misses the gate is not given up on. First the other forms of the
same quantization are tried whole (the caller's ``alternatives``: per-channel weight
scales; SmoothQuant, which moves activation outliers into the weights): one that passes
keeps every layer int8. Otherwise, on the form that scored best, each layer's
sensitivity is measured by quantizing it alone, and the most sensitive layers are kept
in float, one, then two, then four..., until a candidate passes or the trial budget is
spent.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import StepNotApplicable


def tune(build: Callable[[frozenset, str | None], Any], evaluate: Callable[[Any], float],
         layers: list[str], context, budget: int,
         alternatives: Sequence[tuple[str, Callable[[frozenset, str | None], Any]]] = ()) -> tuple[Any, dict]:
    """Find a candidate that passes ``context.passes``.

    :param build: ``build(excluded, only)`` quantizes every layer but ``excluded``, or only
        the layer ``only`` when it is given, and returns the candidate.
    :param evaluate: the candidate's quality, scored as the gate scores it.
    :param layers: the quantizable layers, largest first (probed in that order).
    :param budget: the most candidates built after the first.
    :param alternatives: ``(form, build)`` pairs tried whole when the first candidate
        misses the gate, before any layer is kept in float.
    :returns: the first passing candidate, else the best one, and a record for the lineage.
    """
    trials: list[dict] = []

    def trial(form, builder, excluded=(), only=None):
        # Each trial builds and scores a whole candidate (a static one calibrates again):
        # minutes on a real model, so the daemon shows which one is under way.
        what = f"only {only}" if only else f"{len(excluded)} layer(s) kept float" if excluded else "every layer"
        context.progress(f"tuning: {form}, {what}", len(trials), budget + 1)
        candidate = builder(frozenset(excluded), only)
        quality = evaluate(candidate)
        trials.append({"form": form, "excluded": list(excluded), "only": only, "quality": quality})
        return candidate, quality

    candidate, quality = trial("as configured", build)
    if context.passes(quality):
        return candidate, {"tuning": "not needed", "quality": quality}
    builders = {"as configured": build, **dict(alternatives)}
    # quality, candidate, the layers kept in float, form
    best: tuple[float, Any, list[str], str] = (quality, candidate, [], "as configured")
    for form, builder in alternatives:
        if len(trials) > budget:
            break
        try:
            candidate, quality = trial(form, builder)
        except StepNotApplicable:  # e.g. nothing this form can work on: try the next one
            continue
        if context.passes(quality):
            return candidate, {"tuning": "passed", "form": form, "kept_in_float": [], "quality": quality,
                               "trials": trials}
        if quality > best[0]:
            best = (quality, candidate, [], form)
    form = best[3]  # layers are kept in float on the form that scored best whole
    builder = builders[form]
    # Sensitivity: the quality lost when a layer alone is quantized.
    probes = layers[: max(1, (budget - len(trials) + 1) // 2)]
    lost = {}
    for name in probes:
        _, alone = trial(form, builder, only=name)
        lost[name] = context.gate.baseline_quality - alone
    order = sorted(probes, key=lambda name: -lost[name])
    keep_float = 1
    # At least one layer stays quantized, or the "variant" would be the baseline again.
    while len(trials) <= budget and keep_float < len(layers):
        excluded = order[:keep_float]
        candidate, quality = trial(form, builder, excluded)
        if quality > best[0]:
            best = (quality, candidate, excluded, form)
        if context.passes(quality):
            return candidate, {"tuning": "passed", "form": form, "kept_in_float": excluded, "quality": quality,
                               "sensitivity": {k: lost[k] for k in order}, "trials": trials}
        if keep_float >= len(order):
            break
        keep_float *= 2
    quality, candidate, excluded, form = best
    return candidate, {"tuning": "gate not met", "form": form, "kept_in_float": excluded, "quality": quality,
                       "sensitivity": {k: lost[k] for k in order}, "trials": trials}
