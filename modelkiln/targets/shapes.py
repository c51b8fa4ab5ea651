"""What both exporters are told about a model's inputs: example tensors to trace with, and
which dimensions vary between requests (``InputSpec.dims``), with the same dimension
object for inputs that share a name (token ids and their attention mask)."""

from __future__ import annotations

import inspect

# The most rows one call may take: a bound torch.export wants for every dimension.
MAX_BATCH = 65536


def example_args(model, batch: int = 2):
    """Inputs to trace ``model`` with, on the device its module's weights are on. Masks
    are ones (nothing masked), other integer inputs zeros (a valid token id and type)."""
    import torch

    weights = next(iter(model.obj.parameters()), None) if isinstance(model.obj, torch.nn.Module) else None
    device = weights.device if weights is not None else "cpu"
    args = []
    for spec in model.inputs:
        shape = [batch, *spec.shape[1:]]
        dtype = getattr(torch, spec.dtype)
        if not spec.dtype.startswith("int"):
            args.append(torch.randn(shape, dtype=dtype, device=device))
        elif "mask" in spec.name:
            args.append(torch.ones(shape, dtype=dtype, device=device))
        else:
            args.append(torch.zeros(shape, dtype=dtype, device=device))
    return tuple(args)


def dynamic_shapes(module, inputs) -> tuple:
    """torch.export's ``dynamic_shapes`` for ``inputs`` (InputSpecs), shaped like
    ``forward``'s signature: the specs of ``forward(self, *inputs)`` nest in one tuple."""
    import torch

    dims: dict = {}
    specs = []
    for spec in inputs:
        limits = dict(spec.limits)
        axes = {}
        for axis, name in spec.dynamic().items():
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=1, max=limits.get(name, MAX_BATCH))
            axes[axis] = dims[name]
        specs.append(axes)
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    return (tuple(specs),) if kinds == [inspect.Parameter.VAR_POSITIONAL] else tuple(specs)


def onnx_axes(inputs, output_shape) -> tuple[dict, dict]:
    """The ONNX exporter's ``dynamic_axes``: per input its named dimensions, and for the
    output the batch plus every dimension as long as a named input dimension (the
    sequence of an encoder's hidden states)."""
    axes = {spec.name: spec.dynamic() for spec in inputs}
    output = {0: "batch"}
    sizes = {spec.shape[axis]: name for spec in inputs for axis, name in spec.dynamic().items() if axis > 0}
    for axis, size in enumerate(output_shape):
        if axis > 0 and size in sizes:
            output[axis] = sizes[size]
    return axes, output


def tracing_attention():
    """A context in which ``torch.export`` traces ``scaled_dot_product_attention`` by the
    math kernel's shape rules.

    The exported program keeps the one ``aten.scaled_dot_product_attention`` call (at run
    time it dispatches to the fastest kernel for the real shapes, as before); only the
    tracer's choice changes. Why: on a GPU the tracer otherwise follows the
    memory-efficient kernel, which pads an explicit attention mask to 16 columns and
    slices it back, and with the sequence a dynamic dimension that padding becomes guards
    no length satisfies (pytorch/pytorch#124502, fixed upstream by #177495). Seen on an
    H100 with torch 2.11: a tiny Llama's forward program failed to export for a cuda
    target (its CPU export passes), so its variants fell back to TorchScript without
    their decoding program and had no decode figures. That this was the cause is read
    from those issues and not yet confirmed on the GPU (the device run that would show
    the export error did not get a machine)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
