"""Quantized weights as the compressed-tensors format stores them, and the kernels' own
layouts derived from that one form.

LLM servers (vLLM, SGLang) and transformers (with the ``compressed-tensors`` package)
read a quantized Hugging Face folder by its ``quantization_config``: ``quant_method``
``compressed-tensors``, one or more ``config_groups`` each naming the layers it covers
and how their weights were quantized, and per quantized Linear the tensors
``weight_packed`` (the integers, packed into int32 along the input dimension: element
``i`` of a row at bit ``i * bits``, offset by ``2 ** (bits - 1)`` so that it is
unsigned), ``weight_scale`` ([out, groups] in the model's float type), ``weight_shape``
and, for an asymmetric grid, ``weight_zero_point`` (packed the same way along the
output dimension). A weight is ``(q - zero_point) * scale``.

modelkiln's weight-only layers keep their weights in exactly that form (``Compressed``)
and derive their kernels' packings from it, at build and again at load, so that the
folder holds one copy of the weights and says only what they are. Nothing here needs
the ``compressed-tensors`` package: it is what a reader installs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
FLOAT_FORMAT = "float-quantized"
NAIVE_FORMAT = "naive-quantized"
# The largest magnitude of float8_e4m3fn, the FP8 type of weights and activations.
FP8_MAX = 448.0
# A token's activations scaled by their own largest magnitude as the layer runs (the
# scheme llm-compressor calls FP8_DYNAMIC).
FP8_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                         "group_size": None, "dynamic": True}
# The compressed-tensors release whose format this writes (pyproject's optional extra).
FORMAT_VERSION = "0.20.0"


@dataclass
class Compressed:
    """One Linear layer's quantized weight in compressed-tensors terms."""

    q: torch.Tensor  # int8 [out, in] of ``bits``-bit integers; float8_e4m3fn where type is "float"
    scale: torch.Tensor  # float [out, groups]
    zero_point: torch.Tensor | None  # int8 [out, groups]; None for a symmetric grid
    bits: int
    group_size: int | None  # None: one scale per output channel
    type: str = "int"  # "float": FP8 (e4m3) weights
    # The layer's input activations where they are quantized too: each token scaled
    # by its own largest magnitude when the layer runs (FP8 W8A8); None: float inputs.
    activations: dict | None = None

    def weights_args(self) -> dict:
        """The group's ``weights`` entry of the quantization config."""
        # No observer: how the scales were chosen is not the format's to state (ours: the
        # largest magnitude over 7, 127 or 448, not compressed-tensors' own min-max rule).
        return {
            "num_bits": self.bits, "type": self.type, "symmetric": self.zero_point is None,
            "strategy": "group" if self.group_size else "channel", "group_size": self.group_size,
            "dynamic": False,
        }

    @property
    def format(self) -> str:
        """The compressed-tensors format its tensors are stored in: integers packed into
        int32 words; FP8 weights as they are ("float-quantized" with quantized inputs,
        "naive-quantized" weight-only, as compressed-tensors names them)."""
        if self.type == "int":
            return PACK_FORMAT
        return FLOAT_FORMAT if self.activations else NAIVE_FORMAT

    def tensors(self, dtype) -> dict:
        """The tensors stored for the layer, by their names after the layer's own."""
        import torch

        if self.type == "float":
            return {"weight": self.q.contiguous(), "weight_scale": self.scale.to(dtype).contiguous()}
        out = {"weight_packed": pack_int32(self.q, self.bits, dim=1),
               "weight_scale": self.scale.to(dtype).contiguous(),
               "weight_shape": torch.tensor(list(self.q.shape), dtype=torch.int64)}
        if self.zero_point is not None:
            out["weight_zero_point"] = pack_int32(self.zero_point, self.bits, dim=0)
        return out

    def dequantized(self):
        """The float32 weight the integers stand for: ``(q - zero_point) * scale``."""
        q = self.q.float()
        scale = self.scale.float()
        if self.group_size:
            q = q.reshape(q.shape[0], -1, self.group_size)
            zero = 0 if self.zero_point is None else self.zero_point.float()[..., None]
            return ((q - zero) * scale[..., None]).reshape(self.q.shape)
        zero = 0 if self.zero_point is None else self.zero_point.float()
        return (q - zero) * scale


def int4_groups(weight, group_size: int) -> Compressed:
    """Symmetric int4 in groups of ``group_size`` inputs: ``w = q * scale`` with ``q`` in
    [-7, 7] and each group's largest magnitude exact (llm-compressor's ``W4A16``, the
    scheme vLLM's Marlin kernels serve). Symmetric because transformers (5.25, with
    compressed-tensors 0.20) sizes an asymmetric layer's packed zero points wrongly at
    load; on a random-weight MLP the symmetric grid's error was no larger (0.056 against
    0.080 at groups of 64)."""
    import torch

    weight = weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(-1).clamp(min=1e-6) / 7
    q = torch.round(groups / scale[..., None]).clamp(-7, 7)
    return Compressed(q.reshape(out_features, in_features).to(torch.int8), scale, None, 4, group_size)


def fp8_channels(weight, activations: dict | None = None) -> Compressed:
    """FP8 (e4m3) weights with one float32 scale per output channel, each channel's
    largest magnitude at the type's largest value; ``activations`` as ``Compressed``."""
    import torch

    weight = weight.detach().float()
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Compressed(q, scale, None, 8, None, "float", activations)


def int8_channels(weight) -> Compressed:
    """Symmetric int8 with one scale per output channel."""
    import torch

    weight = weight.detach().float()
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    q = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
    return Compressed(q, scale, None, 8, None)


def pack_int32(values, bits: int, dim: int = 1):
    """``values`` (signed integers of ``bits`` bits, 4 or 8) packed into int32 along
    ``dim``: ``32 // bits`` to a word, the first in the lowest bits, each offset to be
    unsigned; the dimension padded with zeros to whole words."""
    import torch

    if bits not in (4, 8):
        raise ValueError(f"packing takes 4 or 8 bits, got {bits}")
    per_word = 32 // bits
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        unsigned = unsigned.t()
    rows, cols = unsigned.shape
    pad = -cols % per_word
    if pad:
        unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    shifts = torch.arange(per_word, dtype=torch.int64, device=unsigned.device) * bits
    words = (unsigned.reshape(rows, -1, per_word) << shifts).sum(-1)
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed, bits: int, size: int, dim: int = 1):
    """The signed integers ``pack_int32`` packed: ``size`` of them along ``dim``."""
    import torch

    per_word = 32 // bits
    words = packed.t() if dim == 0 else packed
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    unsigned = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    values = (unsigned.reshape(words.shape[0], -1)[:, :size] - (1 << (bits - 1))).to(torch.int8)
    return (values.t() if dim == 0 else values).contiguous()


def from_tensors(tensors: dict, args: dict) -> Compressed:
    """A layer's ``Compressed`` from its stored tensors and its group's ``weights`` args
    (and ``input_activations``, where its inputs are quantized too)."""
    if args.get("type") == "float":
        return Compressed(tensors["weight"], tensors["weight_scale"], None, args["num_bits"], None, "float",
                          args.get("input_activations"))
    out_features, in_features = (int(v) for v in tensors["weight_shape"])
    bits = args["num_bits"]
    q = unpack_int32(tensors["weight_packed"], bits, in_features, dim=1)
    zero_point = None
    if "weight_zero_point" in tensors:
        zero_point = unpack_int32(tensors["weight_zero_point"], bits, out_features, dim=0)
    group = args.get("group_size") if args.get("strategy") == "group" else None
    return Compressed(q, tensors["weight_scale"], zero_point, bits, group)


def quantization_config(groups: list[tuple[dict, list[str]]], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: one group per distinct scheme
    (``groups``: a layer's ``scheme`` and the layer names), and the float Linear layers
    named in ``ignore``. With one group it targets every Linear but the ignored ones, as
    llm-compressor writes it."""
    config_groups = {}
    for index, (scheme, names) in enumerate(groups):
        config_groups[f"group_{index}"] = {
            "targets": ["Linear"] if len(groups) == 1 else sorted(names),
            "weights": scheme["weights"], "input_activations": scheme["input_activations"],
            "output_activations": None, "format": scheme["format"],
        }
    formats = {scheme["format"] for scheme, _ in groups}
    return {
        "quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": config_groups,
        "ignore": sorted(ignore) if len(groups) == 1 else [],
        "kv_cache_scheme": None, "global_compression_ratio": None, "version": FORMAT_VERSION,
    }


def scheme(form: Compressed) -> dict:
    """A layer's quantization scheme as its config group states it."""
    return {"weights": form.weights_args(), "input_activations": form.activations, "format": form.format}


# -- the kernels' layouts, derived from the stored form ----------------------------------

# Tiles along the input dimension in PyTorch's CPU int4 packing (its kernels' choice).
CPU_INT4_TILES = 2


def int4_kernel_scales(compressed: Compressed, dtype):
    """PyTorch's int4 kernels' [groups, out, 2] scale-and-zero tensor: they compute
    ``(level - 8) * scale + zero`` with ``level = q + 8``, so ``zero = -zero_point * scale``."""
    import torch

    scale = compressed.scale.float()
    zero = torch.zeros_like(scale) if compressed.zero_point is None else -compressed.zero_point.float() * scale
    return torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)


def int4_cpu_packed(compressed: Compressed):
    """The CPU int4 kernel's packed weight (``_weight_int4pack_mm_for_cpu``)."""
    import torch

    levels = (compressed.q.to(torch.int32) + 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, CPU_INT4_TILES)


def int4_cuda_packed(compressed: Compressed, tiles: int, device):
    """The CUDA int4 kernel's packed weight (tinygemm, ``_weight_int4pack_mm``): two levels
    a byte, the even column in the high nibble, packed on ``device`` (the op exists for
    cuda only)."""
    import torch

    levels = (compressed.q.to(device).to(torch.int32) + 8).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack((levels[:, ::2] << 4) | levels[:, 1::2], tiles)
