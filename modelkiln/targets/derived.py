"""Programs that hold no copy of the weights their variant's folder stores.

A causal LM's variant stores its weights once, as the Hugging Face folder servers load
(``hf_folder.py``). The torch runtime still measures (and serving code may still run)
``torch.export`` programs of it, the forward pass and the static-cache decoder; each
would hold every weight again. So before a program is saved, each of its tensors that
the folder already holds is replaced by a one-element placeholder, and ``serving.json``
records where it comes from:

- ``{"tensor": name}``: a folder tensor as it is;
- ``{"concat": [names]}``: folder tensors one after the other along the first dimension
  (sibling Linear layers fused into one product, ``fusion.py``);
- ``{"derive": kind, "layer": name, ...}``: a quantized kernel's own packing of a layer's
  compressed-tensors weights, computed again where the program loads (``compressed.py``);
- ``{"zeros": true}``: zeros, made where it loads (an empty static KV cache).

What the folder does not hold (rotary tables, lifted constants) stays in the program.
``fill`` puts the weights back when the program loads.
"""

from __future__ import annotations

import functools

from .compressed import Compressed, from_tensors, int4_cpu_packed, int4_cuda_packed, int4_kernel_scales
from .hf_folder import COMPRESSED_ATTR

# Bytes of a tensor's first row that index it (then compared in full).
_KEY_BYTES = 256
# Elements from which a tensor of zeros is worth leaving out of a program.
_ZEROS_WORTH = 4096


def _row_key(tensor):
    import torch

    row = tensor.reshape(tensor.shape[0], -1)[0] if tensor.dim() else tensor.reshape(1)
    head = row[: max(1, _KEY_BYTES // row.element_size())].detach().cpu().contiguous()
    return (row.numel(), str(tensor.dtype), bytes(head.view(torch.uint8).numpy()))


def _placeholder(tensor):
    """One element standing for ``tensor``: NaN where it can be, so that a program loaded
    without its weights answers NaN (which the measurement rejects) rather than numbers.
    On the CPU whatever the program's device: torch saves a GPU tensor by copying it to the
    host, which would expand the one element to the whole tensor."""
    import torch

    fill = float("nan") if tensor.is_floating_point() else 0
    empty = torch.full((), fill, dtype=tensor.dtype).expand(tensor.shape)
    return torch.nn.Parameter(empty, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else empty


@functools.lru_cache(maxsize=1)
def placeholders_survive() -> bool:
    """Whether this torch saves a program whose weights are placeholders small and loads
    it back with their shapes (checked once per process on a tiny program): the archive
    format is torch's own, and where it would store a placeholder whole, or not load it,
    the programs keep their weights instead."""
    import io

    import torch

    try:
        module = torch.nn.Linear(256, 256).eval()
        program = torch.export.export(module, (torch.randn(2, 256),))
        weights = dict(program.state_dict)
        for name, tensor in weights.items():
            program.state_dict[name] = _placeholder(tensor)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        fill(loaded, {name: {"tensor": name} for name in weights}, weights, "cpu")
        x = torch.randn(2, 256)
        return buffer.getbuffer().nbytes < 64 * 256 * 4 and torch.equal(loaded.module()(x), module(x))
    except Exception:  # an archive this code does not know: keep the weights in the programs
        return False


def kernel_sources(lm, prefix: str) -> dict:
    """For each quantized layer of ``lm`` (a ``Compressed`` form and a kernel packing):
    the program names of its kernel's tensors (``prefix`` + layer) and how to derive them."""
    sources = {}
    for layer, module in lm.named_modules():
        form = getattr(module, COMPRESSED_ATTR, None)
        if not isinstance(form, Compressed):
            continue
        derive = getattr(module, "derived_from_stored", None)
        if derive is None:
            continue
        for attr, entry in derive().items():
            sources[f"{prefix}{layer}.{attr}"] = {**entry, "layer": layer, "bits": form.bits,
                                                   "group_size": form.group_size,
                                                   **({"type": form.type} if form.type != "int" else {})}
    return sources


def strip(program, folder: dict, kernels: dict) -> dict:
    """Replace, in place, every tensor of ``program`` that ``folder`` (name -> CPU tensor)
    holds, as it is or concatenated, by a placeholder, and those of ``kernels`` (see
    ``kernel_sources``); returns where each comes from."""
    import torch

    by_key: dict = {}
    for name, tensor in folder.items():
        if tensor.dim() >= 1 and tensor.numel():
            by_key.setdefault(_row_key(tensor), []).append(name)
    sources = {}
    for table in (program.state_dict, program.constants):
        for name, tensor in list(table.items()):
            if not isinstance(tensor, torch.Tensor) or tensor.numel() < 2:
                continue
            source = kernels.get(name) or _found(name, tensor, folder, by_key) or _zeros(tensor)
            if source is not None:
                sources[name] = source
                table[name] = _placeholder(tensor)
    return sources


def _found(name: str, tensor, folder: dict, by_key: dict) -> dict | None:
    short = name.split(".", 1)[-1]  # the wrapper's own attribute ("inner.", "model.") first
    if short in folder and _same(folder[short], tensor):
        return {"tensor": short}
    if tensor.dim() < 1:
        return None
    cpu = tensor.detach().cpu()
    parts, row = [], 0
    while row < cpu.shape[0]:
        match = next((n for n in by_key.get(_row_key(cpu[row:]), ())
                      if folder[n].shape[1:] == cpu.shape[1:] and row + folder[n].shape[0] <= cpu.shape[0]
                      and _equal(folder[n], cpu[row:row + folder[n].shape[0]])), None)
        if match is None:
            return None
        parts.append(match)
        row += folder[match].shape[0]
    return {"tensor": parts[0]} if len(parts) == 1 else {"concat": parts}


def _zeros(tensor) -> dict | None:
    """``{"zeros": True}`` for a tensor of zeros only: an empty static KV cache, which
    for 32 sequences of a 7B model is a gigabyte of zeros a program need not store."""
    import torch

    return {"zeros": True} if tensor.numel() >= _ZEROS_WORTH and not torch.count_nonzero(tensor) else None


def _same(stored, tensor) -> bool:
    # Shape and type first: a tensor that differs in either is never copied off its device.
    return stored.shape == tensor.shape and stored.dtype == tensor.dtype and _equal(stored, tensor.detach().cpu())


def _equal(a, b) -> bool:
    """Bit-for-bit equality, FP8 included (torch compares no FP8 tensors on the CPU)."""
    import torch

    if a.dtype != b.dtype:
        return False
    if a.element_size() == 1 and a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def fill(program, sources: dict, folder: dict, device: str, shared: dict | None = None) -> None:
    """Put back, in place, the tensors ``strip`` took out of ``program``, from ``folder``
    (name -> tensor, the variant's shards), deriving kernel packings on ``device``.
    ``shared``, kept across the programs of one variant, hands each program the same
    tensor on ``device`` for the same source: the forward and decoding programs of a 7B
    model then hold its weights once, not once each."""
    import json

    import torch

    shared = {} if shared is None else shared
    forms: dict = {}
    for name, source in sources.items():
        table = program.state_dict if name in program.state_dict else program.constants
        old = table[name]
        key: tuple[str, str] | None = (json.dumps(source, sort_keys=True), str(old.dtype))
        if "zeros" in source:  # a KV cache: each program its own, never shared
            value = torch.zeros(old.shape, dtype=old.dtype, device=device)
            key = None
        elif key in shared:
            value = shared[key]
        elif "tensor" in source:
            value = folder[source["tensor"]]
        elif "concat" in source:
            value = torch.cat([folder[n] for n in source["concat"]])
        else:
            layer = source["layer"]
            if layer not in forms:
                args = {"num_bits": source["bits"], "group_size": source["group_size"],
                        "strategy": "group" if source["group_size"] else "channel",
                        "type": source.get("type", "int")}
                forms[layer] = from_tensors({k.rsplit(".", 1)[1]: v for k, v in folder.items()
                                             if k.rsplit(".", 1)[0] == layer}, args)
            value = derive(forms[layer], source, device)
        if key is not None and key not in shared:
            value = shared[key] = value.to(device=device, dtype=old.dtype)
        table[name] = torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value


def derive(form: Compressed, source: dict, device: str):
    """A quantized kernel's tensor, computed from the layer's stored form."""
    import torch

    kind = source["derive"]
    if kind == "int4_cpu_packed":
        return int4_cpu_packed(form)
    if kind == "int4_cuda_packed":
        return int4_cuda_packed(form, source["tiles"], device)
    if kind == "int4_scales":
        return int4_kernel_scales(form, getattr(torch, source["dtype"]))
    if kind == "int8_values":
        return form.q
    if kind == "int8_scales":
        return form.scale.float()[:, 0].contiguous()
    if kind == "int4_stored_scales":
        return form.scale.to(getattr(torch, source["dtype"])).contiguous()
    if kind == "fp8_scale_row":
        return form.scale.float().reshape(1, -1).contiguous()
    raise ValueError(f"serving.json names a derivation this modelkiln does not know: {kind!r}; "
                     "load the variant with the modelkiln release that built it")
