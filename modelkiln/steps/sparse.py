"""Built-in 2:4 semi-structured sparsity: ``prune.sparse24``.

Two of every four consecutive weights along a Linear layer's input dimension are set to
zero: the pattern NVIDIA's sparse tensor cores (Ampere and later) skip, so a product
reads half the weights and does half the multiplications. Which two go is decided per
group by each weight's size times the norm of the input it reads on the checkpoint's
data (a small weight on a loud input matters more than a large one on a quiet input);
weight size alone where there is no data. A distilled recovery fine-tune follows where
data exists, the zeros held after every update.

The artifact keeps the masked weights dense, so it loads and answers anywhere; on a GPU
the runtime turns every weight with the 2:4 pattern into PyTorch's
``to_sparse_semi_structured`` form and replays the model as CUDA graphs (see
``targets/semistructured.py``), which is what makes it faster. Layers the sparse kernels
cannot take (widths not a multiple of 16) and the model's head (``lm_head``,
``classifier``: the layer whose every output the user reads) stay dense.
"""

from __future__ import annotations

import copy

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import MASK, SPARSE24, TORCH, ModelHandle, Param
from ..targets.semistructured import KERNEL_MULTIPLE, kernel_widths
from .layers import linear_layers
from .quantize import unwrap_half_precision
from .training import TrainingStep, budget_of, budget_params, distill, real_tokens, training_data

# Output layers left dense: pruning them changes every score the user reads.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler")
# Rows of the data whose activations weigh the weights, in chunks of CHUNK_ROWS.
IMPORTANCE_ROWS, CHUNK_ROWS = 128, 16


def sparse_layers(module) -> tuple[list, dict]:
    """``([(name, Linear)], {name: why it stays dense})`` for the layers of ``module``."""

    def unfit(layer) -> str | None:
        if kernel_widths(layer.out_features, layer.in_features):
            return None
        return f"{layer.out_features} x {layer.in_features}: not multiples of {KERNEL_MULTIPLE}"

    return linear_layers(module, HEAD_NAMES, unfit)


def input_norms(module, layers: list, inputs: dict) -> dict:
    """Per layer, the L2 norm of each input feature over the real tokens of ``inputs``
    (padding left out where an ``attention_mask`` marks it)."""
    import torch

    arrays = {name: torch.from_numpy(a[:IMPORTANCE_ROWS]) for name, a in inputs.items()}
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers}
    mask: list[torch.Tensor | None] = [None]  # the chunk's, for the hooks

    def hook(name):
        def add(layer, args):
            sums[name] += real_tokens(args[0].detach(), mask[0]).double().pow(2).sum(0).cpu()
        return add

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    try:
        with torch.no_grad():
            total = len(next(iter(arrays.values())))
            for start in range(0, total, CHUNK_ROWS):
                chunk = [a[start:start + CHUNK_ROWS] for a in arrays.values()]
                mask[0] = arrays[MASK][start:start + CHUNK_ROWS] if MASK in arrays else None
                module(*chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


def two_of_four(scores):
    """A boolean mask keeping the two highest ``scores`` of every four along the last dimension."""
    import torch

    groups = scores.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(scores.shape)


class Sparse24(TrainingStep):
    name = "prune.sparse24"
    description = ("2:4 semi-structured sparsity of the Linear layers for NVIDIA sparse tensor cores (cuda "
                   "targets; the kernels take 16-bit weights: prune.sparse24 -> quantize.bf16), then a distilled "
                   "recovery fine-tune with the zeros held")
    params = (
        Param("recovery_steps", int, 200, "fine-tune steps distilled from the original; 0 for none"),
        Param("learning_rate", float, 1e-4, "of the recovery fine-tune"),
        *budget_params("recovery fine-tune"),
    )
    forms = {"torch": TORCH}

    def apply(self, model, params, context):
        import torch

        _check_device(context.device)
        module, _ = unwrap_half_precision(model.obj)
        layers, dense = sparse_layers(module)
        if not layers:
            raise StepNotApplicable("no Linear layer the 2:4 kernels take (widths multiples of "
                                    f"{KERNEL_MULTIPLE}, the head left dense)")
        data, source = training_data(context)
        float32 = all(layer.weight.dtype == torch.float32 for _, layer in layers)
        recovering = params["recovery_steps"] > 0 and float32
        teacher = copy.deepcopy(model.obj).eval() if recovering else None
        try:
            norms = input_norms(model.obj, layers, data) if data else {}
        except Exception as exc:  # weighed by size alone then, and the lineage says why
            norms, source = {}, f"none ({type(exc).__name__}: {exc})"
        masks = {}
        with torch.no_grad():
            for name, layer in layers:
                weight = layer.weight
                scores = weight.abs().float()
                if name in norms:
                    scores = scores * norms[name].to(scores.device)
                masks[name] = two_of_four(scores)
                weight.mul_(masks[name].to(weight.dtype))
        record = {"sparse_layers": len(layers), "dense_layers": dense,
                  "importance": ("|weight| x input norm on the data" if norms else "|weight|"),
                  "importance_data": source if norms else None,
                  "sparse_weights": sum(layer.weight.numel() for _, layer in layers)}
        if recovering:
            held = [(layer.weight, masks[name]) for name, layer in layers]

            def hold_zeros():
                with torch.no_grad():
                    for weight, mask in held:
                        weight.mul_(mask.to(weight.dtype))

            trained = distill(model.obj, teacher, data, params["recovery_steps"], params["learning_rate"],
                              context=context, **budget_of(params), activity="recovery fine-tune",
                              after_step=hold_zeros)
            record.update({f"recovery_{k}": v for k, v in trained.items() if v is not None})
            record["recovery_data"] = source
        elif params["recovery_steps"] > 0:
            # Adam's small updates vanish in 16-bit weights: recovery trains in float32.
            record["recovery"] = ("skipped: the weights are 16-bit; where a quantize.bf16 (or fp16) step made "
                                  "them so, put prune.sparse24 before it to recover in float32")
        with torch.no_grad():
            zeros = sum(int((layer.weight == 0).sum()) for _, layer in layers)
        record["sparsity"] = zeros / record["sparse_weights"]
        context.record.update(record)
        return ModelHandle(TORCH, model.obj, model.inputs, {**model.notes, SPARSE24: True})


def _check_device(device: str) -> None:
    """Raise StepNotApplicable unless ``device`` has sparse tensor cores PyTorch can use."""
    import torch

    if not device.startswith("cuda"):
        raise StepNotApplicable(f"2:4 sparse kernels run on NVIDIA GPUs (compute capability 8.0 or later); "
                                f"this target's device is {device} (list the step under a target with "
                                f'device = "cuda")')
    if not torch.cuda.is_available():
        raise StepNotApplicable("2:4 sparse kernels need CUDA, and this PyTorch build or host has none")
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    cusparselt = torch.backends.cusparselt.is_available()
    # PyTorch's other 2:4 kernels (CUTLASS) take compute capability 8.x only.
    if major < 8 or (major > 8 and not cusparselt):
        raise StepNotApplicable(f"{device} (compute capability {major}.{minor}) has no 2:4 sparse kernel in this "
                                f"PyTorch build (cuSPARSELt {'present' if cusparselt else 'absent'})")


@hookimpl
def kiln_steps():
    return [Sparse24()]
