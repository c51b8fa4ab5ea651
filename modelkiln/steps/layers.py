"""Which Linear layers a step rewrites, and why it leaves the others as they are."""

from __future__ import annotations

from collections.abc import Callable


def linear_layers(module, heads: tuple[str, ...], unfit: Callable) -> tuple[list, dict]:
    """``([(name, Linear)], {name: why it is left})`` for the Linear layers of ``module``:
    a layer whose name has a part in ``heads`` is the model's head (every score the user
    reads comes out of it) and is left, as is one for which ``unfit(layer)`` gives a reason."""
    import torch.nn as nn

    kept, left = [], {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if any(part in heads for part in name.split(".")):
            left[name] = "the model's head"
        elif why := unfit(layer):
            left[name] = why
        else:
            kept.append((name, layer))
    return kept, left
