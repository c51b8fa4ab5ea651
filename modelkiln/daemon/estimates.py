"""What a variant job is expected to cost and to gain: the order jobs are leased in.

A job's priority is its expected seconds over its expected gain, lowest first, so that
exports and post-training quantization run (and can be promoted) before anything that
trains. Both figures come from the catalogue where it has them: the same recipe on an
earlier checkpoint of the same model, on the same target and runtime, took so many
seconds and reached such a latency against that checkpoint's baseline. Without history,
the seconds come from the model's size and each step's own estimate
(``Step.expected_seconds``), and every recipe is expected to gain as much as another.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plugins.recipes import parse_recipe
from ..store import queries
from ..store.models import Checkpoint

# A baseline job without history: loading, exporting and timing a model of this many
# bytes, at this rate, after a fixed start. Rough on purpose: history replaces it after
# the first checkpoint of a model.
FIXED_SECONDS = 10.0
BYTES_PER_SECOND = 20e6
# A recipe that failed or was skipped last time is expected to gain this little: it
# runs after the rest.
FAILED_GAIN = 0.25


@dataclass(frozen=True)
class Planned:
    """One variant to build, as planning hands it to the store."""

    target: str
    runtime: str
    recipe: str  # canonical text; "" is the baseline
    estimate_seconds: float
    priority: float
    # Where the estimate came from: "history" or "size".
    basis: str = "size"
    # Why it is skipped without a job running (a step that does not serve the runtime).
    skip_reason: str | None = None


def baseline_seconds(size_bytes: int) -> float:
    return FIXED_SECONDS + size_bytes / BYTES_PER_SECOND


def static_seconds(recipe, steps: dict, size_bytes: int) -> float:
    """Seconds for ``recipe`` (parsed) from the model's size and its steps' estimates."""
    base = baseline_seconds(size_bytes)
    seconds = base
    for ref in recipe.steps:
        step = steps[ref.name]
        params = {**{p.name: p.default for p in step.params}, **dict(ref.params)}
        seconds += step.expected_seconds(params, base, size_bytes)
    return seconds


def _gain(session, variant, target: str, batch_size: int) -> float:
    """What the recipe's variant gained on an earlier checkpoint: that checkpoint's best
    baseline latency over the variant's (1.0 where either is missing)."""
    if variant.status != "succeeded":
        return FAILED_GAIN
    latency = next((m.latency_p50_ms for m in variant.measurements if m.batch_size == batch_size), None)
    baseline = queries.best_objective(session, variant.checkpoint_id, target, batch_size)
    if not latency or not baseline:
        return 1.0
    return max(FAILED_GAIN, baseline / latency)


def plan_entry(session, checkpoint: Checkpoint, target: str, runtime: str, recipe_text: str, steps: dict,
               batch_size: int) -> Planned:
    recipe = parse_recipe(recipe_text, steps)
    for ref in recipe.steps:  # known now: no worker needs to start to find it out
        if runtime not in steps[ref.name].forms:
            return Planned(target, runtime, recipe.text, 0.0, 0.0, "size",
                           skip_reason=f"{ref.name} does not serve the {runtime} runtime")
    history = queries.recipe_history(session, checkpoint.model, target, runtime, recipe.text, checkpoint.id)
    if history is not None:
        variant, seconds = history
        seconds = max(seconds, 1.0)
        return Planned(target, runtime, recipe.text, seconds, seconds / _gain(session, variant, target, batch_size),
                       "history")
    seconds = static_seconds(recipe, steps, checkpoint.size_bytes)
    return Planned(target, runtime, recipe.text, seconds, seconds, "size")
