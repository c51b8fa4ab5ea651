"""A causal language model's variant as LLM servers load it: a Hugging Face folder.

vLLM, SGLang, TensorRT-LLM and transformers load a folder of ``config.json``,
``generation_config.json``, the tokenizer's files and the weights as safetensors
shards with their index (``model.safetensors.index.json``); none of them loads a
``torch.export`` program. So the torch runtime writes every causal-LM variant's
weights that way, once, and the programs it measures are derived from them (see
``torchrt.py``).

Float weights are stored as they are (``dtype`` in the config says which). Weights
quantized weight-only by modelkiln (int4 groups, int8 channels) are stored as
compressed-tensors stores them, with ``quantization_config`` in the config
(``compressed.py``): transformers loads them with the ``compressed-tensors`` package
installed, vLLM and SGLang with their own kernels. A layer of any other kind (a step's
own module, torch.ao's dynamic int8) has no form a server reads: then no folder is
written, and the reason says which layer, rather than a config claiming what the
weights are not.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

from . import blobs as blob_store
from .compressed import Compressed, quantization_config, scheme

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
# Shards of at most this many bytes (transformers' own default for save_pretrained).
SHARD_BYTES = 5 * 1024 ** 3
# The attribute a quantized layer keeps its stored form in (a ``Compressed``).
COMPRESSED_ATTR = "compressed"
# Where module classes come from whose weights are plain tensors a server reads by name.
_PLAIN_MODULES = ("torch.nn.", "transformers.")


def unwritable_reason(lm) -> str | None:
    """Why ``lm``'s weights have no form an LLM server reads, or None."""
    for name, module in lm.named_modules():
        if isinstance(getattr(module, COMPRESSED_ATTR, None), Compressed):
            continue
        if type(module).__module__.startswith(_PLAIN_MODULES):
            continue
        if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) \
                is not None or hasattr(module, "_packed_params"):
            return (f"layer {name} ({type(module).__name__}) holds weights in a form of its own, which has no "
                    "compressed-tensors (or plain Hugging Face) form: no LLM server reads them")
    return None


def _float_dtype(lm):
    import torch

    dtypes = [p.dtype for p in lm.parameters() if p.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def stored_tensors(lm) -> tuple[dict, list[tuple[dict, list[str]]], list[str]]:
    """The tensors the folder stores, by name; the quantized layers grouped by their
    weight arguments; the Linear layers left in float."""
    import torch

    dtype = _float_dtype(lm)
    compressed = {name: getattr(m, COMPRESSED_ATTR) for name, m in lm.named_modules()
                  if isinstance(getattr(m, COMPRESSED_ATTR, None), Compressed)}
    tensors, seen = {}, {}
    for name, tensor in lm.state_dict().items():
        layer, _, attr = name.rpartition(".")
        if layer in compressed and attr != "bias":
            continue  # the kernel's packing: derived from the stored form, not stored
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        shared = key in seen  # tied (an LM head sharing the embeddings): stored once, tied by config
        if shared and getattr(lm.config, "tie_word_embeddings", False):
            continue
        seen[key] = name
        # Untied by config, yet sharing storage: safetensors stores no two names on one storage.
        tensors[name] = (tensor.clone() if shared else tensor).detach().cpu().contiguous()
    groups: dict[str, tuple[dict, list[str]]] = {}
    for layer, form in compressed.items():
        for attr, tensor in form.tensors(dtype).items():
            tensors[f"{layer}.{attr}"] = tensor.detach().cpu().contiguous()
        args = scheme(form)
        groups.setdefault(json.dumps(args, sort_keys=True), (args, []))[1].append(layer)
    float_linears = [name for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    return tensors, list(groups.values()), float_linears


def save(lm, directory, shard_bytes: int = SHARD_BYTES, blobs=None) -> tuple[dict, dict]:
    """Write ``lm`` (a transformers causal LM, its layers maybe quantized by modelkiln) into
    ``directory`` as a Hugging Face folder; return what ``variant.json`` says of it (the
    format, its quantization and the servers that read it) and the tensors stored, by
    name; or ``{"format": None, "reason": ...}`` and nothing when it has no such form
    (nothing is written then). ``blobs``: the blob store (``blobs.py``), where a shard
    whose content another variant stored already is linked from instead of written."""
    from safetensors.torch import save_file

    reason = unwritable_reason(lm)
    if reason is not None:
        return {"format": None, "reason": reason}, {}
    tensors, groups, float_linears = stored_tensors(lm)
    config = copy.deepcopy(lm.config)
    config.dtype = _float_dtype(lm)
    reason = _config_mismatch(lm, config, tensors, groups)
    if reason is not None:
        return {"format": None, "reason": reason}, {}
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map, files, linked = {}, [], []
    metadata = {"format": "pt"}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        key = blob_store.tensors_key(shard, metadata) if blobs is not None else ""
        def write(path, shard: dict = shard) -> None:
            save_file(shard, str(path), metadata=metadata)

        if blob_store.place(blobs, key, directory / file, write):
            linked.append(file)
        weight_map.update(dict.fromkeys(shard, file))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))
    described: dict = {"format": "huggingface", "files": [CONFIG_FILE, GENERATION_FILE, INDEX_FILE, *files]}
    if linked:  # stored once: hard links to shards another variant of this artifacts root wrote
        described["shared_files"] = linked
    if groups:
        config.quantization_config = quantization_config(groups, float_linears)
        described["quantization"] = {"format": "compressed-tensors", "config_groups": len(groups),
                                     "schemes": [_scheme_name(args) for args, _ in groups],
                                     "layers": sum(len(names) for _, names in groups)}
        described["readers"] = ["transformers (with compressed-tensors installed)", "vLLM", "SGLang"]
        head = lm.get_output_embeddings()
        head_name = next((name for name, m in lm.named_modules() if m is head), None)
        if any(head_name in names for _, names in groups):
            # A quantized output head is where servers' compressed-tensors readers have
            # failed: vLLM read it as a float head until its PR #37291, and SGLang served
            # garbage from one (sglang#35358). Named only where it is known to work.
            described["readers"] = ["transformers (with compressed-tensors installed)"]
            described["not_read_by"] = {"vLLM, SGLang": f"the output head ({head_name}) is quantized, which "
                                                        "their compressed-tensors readers have not all taken "
                                                        "(vLLM from PR #37291 on)"}
    else:
        described["quantization"] = None
        described["readers"] = ["transformers", "vLLM", "SGLang", "TensorRT-LLM"]
    config.to_json_file(str(directory / CONFIG_FILE))
    generation = copy.deepcopy(lm.generation_config)
    # modelkiln's decoding program asks for a static cache; the folder's readers choose their own.
    generation.cache_implementation = None
    generation.to_json_file(str(directory / GENERATION_FILE))
    return described, tensors


def _config_mismatch(lm, config, tensors: dict, groups) -> str | None:
    """Why the folder would not load as its config describes it (a step changed the model's
    shape without its config), or None: the tensors a model built from ``config`` expects
    against those stored, a quantized layer's weight standing for its packed form."""
    import torch

    quantized = {layer for _, layers in groups for layer in layers}
    stored = {}
    for name, tensor in tensors.items():
        layer, _, attr = name.rpartition(".")
        if layer in quantized:
            if attr == "weight_shape":
                stored[f"{layer}.weight"] = tuple(int(v) for v in tensor)
            elif attr in ("bias", "weight"):  # FP8 weights are stored in their own shape
                stored[name] = tuple(tensor.shape)
        else:
            stored[name] = tuple(tensor.shape)
    with torch.device("meta"):
        skeleton = type(lm)(config)
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    wrong = sorted(k for k in expected.keys() | stored.keys()
                   if expected.get(k) != stored.get(k) and not (k in tied and k not in stored))
    if not wrong:
        return None
    return (f"its weights do not match its config ({len(wrong)} tensors differ, e.g. {wrong[0]}: stored "
            f"{stored.get(wrong[0])}, config {expected.get(wrong[0])}): a step changed the model's shape "
            "without its config, so no server could load the folder")


def _scheme_name(scheme: dict) -> str:
    """A layer group's scheme in words, e.g. ``W4A16 int4, groups of 64, symmetric`` or
    ``W8A8 FP8, per channel, inputs per token``."""
    args = scheme["weights"]
    grid = f"groups of {args['group_size']}" if args["strategy"] == "group" else "per channel"
    symmetry = "symmetric" if args["symmetric"] else "asymmetric"
    if args["type"] == "float":
        inputs = scheme["input_activations"]
        return (f"W8A8 FP8, {grid}, inputs per {inputs['strategy']}" if inputs else f"W8A16 FP8, {grid}")
    return f"W{args['num_bits']}A16 int{args['num_bits']}, {grid}, {symmetry}"


def load_state(directory) -> dict:
    """Every tensor of the folder's shards, by name (on the CPU)."""
    from safetensors.torch import load_file

    index = json.loads((directory / INDEX_FILE).read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / file)))
    return tensors
