"""Weights rounded with error feedback on the checkpoint's data (GPTQ's method).

Round-to-nearest quantizes each weight alone. What the model answers depends on each
layer's products ``x @ W.T`` over the inputs it really sees, and two rounding errors on
inputs that move together can cancel. Error feedback rounds a layer's input columns one
at a time and spreads each column's rounding error over the columns not yet rounded, in
proportion to how the inputs co-vary (``H = sum x x^T`` over real tokens): the product on
the data stays close to the float one where round-to-nearest lets the errors add up.

The integers and scales are those of round-to-nearest's grid (symmetric, the same groups:
``targets/compressed.py``), so the kernels, the variant folder and every reader take them
unchanged; only which integer each weight gets differs.

Layers are taken in the model's order, a few at a time: their ``H`` is gathered on the
model whose earlier layers already hold their rounded weights, so each layer also makes
up for the error of the layers before it. Layers that read the same tensor (a block's
query, key and value projections) share one ``H``.
"""

from __future__ import annotations

from ..plugins.api import MASK
from .training import real_tokens

# Rows of the data the statistics are gathered on, run CHUNK_ROWS at a time.
FIT_ROWS, CHUNK_ROWS = 128, 8
# Added to H's diagonal, as a share of its mean: keeps the inverse stable where inputs
# are (nearly) constant or never seen.
DAMPING = 0.01
# Input columns rounded per pass of the feedback loop (a multiple of every group size).
COLUMN_BLOCK = 128
# The H matrices held at once (float32 bytes); layers beyond wait for the next pass.
PASS_BYTES = 2 * 1024**3


def fit_rows(data: dict, inputs: list) -> tuple[list, list]:
    """The first FIT_ROWS rows of ``data`` as tensors in the model's input order, and
    their names."""
    import torch

    names = [spec.name for spec in inputs if spec.name in data] or list(data)
    return [torch.from_numpy(data[name][:FIT_ROWS]) for name in names], names


def quantize_with_feedback(module, layers: list, data: dict, inputs: list, round_layer, device: str,
                           progress=None) -> dict:
    """Round every ``(name, Linear)`` of ``layers`` with error feedback on ``data``.

    ``round_layer(weight, hessian)`` gives a layer's ``Compressed`` form (``solve`` with
    the step's grid). Each layer's weight is set to what its integers stand for as soon
    as it is rounded, so later layers see the rounded model. Returns ``{name:
    Compressed}``; a layer the data never reaches is left out (rounded to nearest by its
    layer class)."""
    import torch

    rows, names = fit_rows(data, inputs)
    mask = rows[names.index(MASK)] if MASK in names else None
    forms: dict = {}
    pending = list(layers)
    while pending:
        batch: list = []
        size = 0
        for name, layer in pending:
            size += layer.in_features ** 2 * 4
            if batch and size > PASS_BYTES:
                break
            batch.append((name, layer))
        pending = pending[len(batch):]
        hessians = gather_hessians(module, batch, rows, mask, device)
        for name, layer in batch:
            if name not in hessians:
                continue
            hessian, _ = hessians[name]
            with torch.no_grad():
                form = round_layer(layer.weight.detach().to(device), hessian)
                layer.weight.copy_(form.dequantized().to(layer.weight.device, layer.weight.dtype))
            forms[name] = form
            if progress is not None:
                progress(len(forms), len(layers))
        del hessians
    return forms


def gather_hessians(module, layers: list, rows: list, mask, device: str) -> dict:
    """``{name: (H, tokens)}`` for ``layers``: ``H = sum x x^T`` over the real tokens each
    layer reads on ``rows`` (float32 on ``device``). Layers reading one tensor share it."""
    import torch

    # The inputs seen in the current call, kept alive so that no later tensor of the call
    # takes one's id: id -> (tensor, [H, tokens]).
    shared: dict = {}
    owner: dict = {}
    current_mask = [None]

    def hook(name, layer):
        def add(_, args):
            x = args[0]
            seen = shared.get(id(x))
            entry = seen[1] if seen is not None and seen[0] is x else None
            if entry is None:
                entry = owner.get(name)
                if entry is None:
                    entry = owner[name] = [torch.zeros(layer.in_features, layer.in_features, device=device), 0]
                tokens = real_tokens(x.detach(), current_mask[0]).to(device=device, dtype=torch.float32)
                entry[0].addmm_(tokens.t(), tokens)
                entry[1] += tokens.shape[0]
                shared[id(x)] = (x, entry)
            elif owner.get(name) is None:
                owner[name] = entry  # the same input as an earlier layer: its H is this one's too
        return add

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers]
    model_device = next(module.parameters()).device
    try:
        with torch.no_grad():
            total = len(rows[0])
            for start in range(0, total, CHUNK_ROWS):
                chunk = [r[start:start + CHUNK_ROWS].to(model_device) for r in rows]
                current_mask[0] = None if mask is None else mask[start:start + CHUNK_ROWS].to(model_device)
                shared.clear()
                module(*chunk)
    finally:
        for handle in handles:
            handle.remove()
    # A layer the data never reaches has no statistics: it is rounded to nearest.
    return {name: (owner[name][0], owner[name][1]) for name, _ in layers if name in owner}


def solve(weight, hessian, bits: int, group_size: int | None):
    """``weight`` ([out, in]) rounded to symmetric ``bits``-bit integers with error
    feedback under ``hessian`` ([in, in]); scales per ``group_size`` inputs (None: per
    output channel), each taken from the group's weights as the loop reaches them.
    Returns a ``Compressed``."""
    import torch

    from ..targets.compressed import Compressed

    weight = weight.detach().float().clone()
    hessian = hessian.clone()
    out_features, in_features = weight.shape
    top = 2 ** (bits - 1) - 1  # 7 or 127: the symmetric grid round-to-nearest uses
    dead = torch.diagonal(hessian) == 0  # inputs never non-zero: their weights do nothing
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian.diagonal().add_(DAMPING * torch.diagonal(hessian).mean())
    inverse = _upper_inverse_factor(hessian)
    q = torch.zeros(out_features, in_features, dtype=torch.int8, device=weight.device)
    groups = group_size or in_features
    scale = torch.zeros(out_features, in_features // groups, device=weight.device)
    if group_size is None:
        scale[:, 0] = weight.abs().amax(1).clamp(min=1e-12) / top
    for start in range(0, in_features, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, in_features)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if group_size is not None and column % group_size == 0:
                scale[:, column // group_size] = block[:, i:i + group_size].abs().amax(1).clamp(min=1e-6) / top
            s = scale[:, column // groups]
            level = torch.round(block[:, i] / s).clamp(-top, top)
            q[:, column] = level.to(torch.int8)
            error = (block[:, i] - level * s) / inv[i, i]
            block[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return Compressed(q, scale, None, bits, group_size)


def _upper_inverse_factor(hessian):
    """The upper Cholesky factor of ``hessian``'s inverse, which the feedback loop reads
    row by row; more damping where the matrix is too ill-conditioned to factor."""
    import torch

    damp = DAMPING * torch.diagonal(hessian).mean()
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return factor
        hessian = hessian.clone()
        hessian.diagonal().add_(damp)
        damp = damp * 10
    raise RuntimeError("the layer's input statistics could not be factored even with heavy damping")


def output_error(weight, form, hessian) -> float:
    """The rounded layer's squared output error on the data, relative to the float
    layer's output energy: ``tr(D H D^T) / tr(W H W^T)`` with ``D`` the weight error."""
    import torch

    weight = weight.detach().float().to(hessian.device)
    diff = form.dequantized().to(hessian.device) - weight
    energy = torch.einsum("oi,ij,oj->", weight, hessian, weight)
    return float(torch.einsum("oi,ij,oj->", diff, hessian, diff) / energy.clamp(min=1e-30))
