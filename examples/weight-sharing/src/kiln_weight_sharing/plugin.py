"""The ``share.weights`` step: every Linear layer's weights clustered into ``k`` shared values.

Each layer keeps a codebook of ``k`` float values and, per weight, the uint8 index of its
value (``k`` <= 256), so the weights take a quarter of their float32 size in the saved
program; the layer rebuilds its weight from the two at run time. The clustering is
one-dimensional k-means (Lloyd's iterations) started from the weights' quantiles, so the
dense middle of the distribution gets most of the values. modelkiln measures the
variant like any other (size, latency, quality against the original) and promotes it
only if it keeps the quality bar; the lineage records what the step did per layer.
"""

from __future__ import annotations

from modelkiln.plugins import hookimpl
from modelkiln.plugins.api import TORCH, ModelHandle, Param, Step, StepNotApplicable

# Elements per chunk when assigning weights to centroids: bounds the k-fold temporary.
CHUNK = 1 << 20


def cluster(values, k: int, iterations: int):
    """1-D k-means of a flat float tensor: returns (codebook [k], indices uint8 like values)."""
    import torch

    flat = values.detach().float().flatten()
    k = min(k, flat.numel())
    codebook = torch.quantile(flat[torch.randperm(flat.numel())[:1 << 16]] if flat.numel() > 1 << 16 else flat,
                              torch.linspace(0, 1, k))
    for _ in range(iterations):
        indices = assign(flat, codebook)
        sums = torch.zeros(k).index_add_(0, indices, flat)
        counts = torch.bincount(indices, minlength=k).float()
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
        if torch.allclose(moved, codebook):
            break
        codebook = moved
    return codebook, assign(flat, codebook).to(torch.uint8).view(values.shape)


def assign(flat, codebook):
    import torch

    parts = [(flat[i:i + CHUNK, None] - codebook[None, :]).abs().argmin(dim=1) for i in range(0, flat.numel(), CHUNK)]
    return torch.cat(parts)


def shared_linear(linear, k: int, iterations: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SharedLinear(nn.Module):
        """A Linear layer whose weight is ``codebook[indices]``: both are saved, not the weight."""

        def __init__(self):
            super().__init__()
            codebook, indices = cluster(linear.weight, k, iterations)
            self.register_buffer("codebook", codebook.to(linear.weight.dtype))
            self.register_buffer("indices", indices)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

        def forward(self, x):
            weight = self.codebook[self.indices.to(torch.int64)]
            return F.linear(x, weight, self.bias)

    return SharedLinear()


class ShareWeights(Step):
    name = "share.weights"
    description = "weight sharing: k shared values per Linear layer, saved as uint8 indices plus a codebook"
    params = (
        Param("k", int, 16, "shared values per layer (2..256)"),
        Param("iterations", int, 25, "k-means iterations at most"),
        Param("min_weights", int, 1024, "layers with fewer weights stay as they are"),
    )
    # The saved torch.export program keeps the indices and the codebook; an ONNX export
    # would fold them back into a float weight, so onnxruntime is not served.
    forms = {"torch": TORCH}

    def apply(self, model, params, context):
        import torch
        import torch.nn as nn

        k = params["k"]
        if not 2 <= k <= 256:
            raise StepNotApplicable(f"{self.name}: k must be in 2..256 (uint8 indices), got {k}")
        module = model.obj
        targets = [(name, m) for name, m in module.named_modules()
                   if isinstance(m, nn.Linear) and m.weight.numel() >= params["min_weights"]
                   and m.weight.dtype == torch.float32]
        if not targets:
            raise StepNotApplicable(f"{self.name}: no float32 Linear layer with at least "
                                    f"{params['min_weights']} weights")
        torch.manual_seed(0)  # the quantile sample: the same variant every time
        layers = {}
        with torch.no_grad():
            for name, linear in targets:
                shared = shared_linear(linear, k, params["iterations"])
                error = (shared.codebook[shared.indices.long()] - linear.weight).abs().mean().item()
                layers[name] = {"weights": linear.weight.numel(), "mean_abs_error": round(error, 6)}
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, child, shared)
        weights = sum(v["weights"] for v in layers.values())
        context.record.update(
            k=k, layers=len(layers), shared_weights=weights,
            # float32 weights -> uint8 indices plus k floats per layer
            weight_bytes_before=4 * weights, weight_bytes_after=weights + 4 * k * len(layers),
            per_layer=layers,
        )
        return ModelHandle(TORCH, module, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [ShareWeights()]
