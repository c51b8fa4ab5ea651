"""Streamed variants: size-capped safetensors shards, loaded layer by layer while running.

For a target whose memory budget is below the model's size. The artifact is the
Hugging Face index layout any tool reads — ``model-00001-of-000NN.safetensors`` shards of
at most ``shard_mb`` each and ``model.safetensors.index.json`` mapping every tensor to its
shard — plus ``architecture.json``, what rebuilds the module without its weights: the
transformers class and its config for a Hugging Face model, or, for weights built into a
module by a factory (``[architectures.<model>] factory`` in the config), that factory's
``module:callable``, imported where the variant is served as the daemon imported it to
load the checkpoint. No code is stored in the artifact.

Serving builds the model's skeleton on the meta device (no weight memory), keeps the
buffers resident (small), and gives every module that owns parameters a pre-hook that
reads them from its shard just before it runs and a hook that drops them after. So the
weights held at any moment are one module's, whatever the model's size; a shard is never
split inside a module, which is what makes each read one file. The price is reading
the weights every call (from the page cache when the host has it, from disk otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

from .serving import Serving

INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE_FILE = "architecture.json"


def _owners(module) -> list:
    """``(submodule, [(local name, full name), ...])`` for each module that owns
    parameters, in registration order; a tied parameter is listed under every module that
    uses it, with the full name it is saved under."""
    canonical = {id(p): name for name, p in module.named_parameters()}
    owners = []
    for sub in module.modules():
        names = [(local, canonical[id(param)]) for local, param in sub.named_parameters(recurse=False)]
        if names:
            owners.append((sub, names))
    return owners


def architecture_of(module, factory: str | None = None) -> dict | None:
    """What rebuilds ``module``'s skeleton: a Hugging Face wrapper's transformers class and
    config, else the ``factory`` that built it; None when neither is known."""
    inner = getattr(module, "inner", None)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"class": type(inner).__name__, "config": config.to_dict(),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                # What the wrapper takes and returns, as the checkpoint's did.
                "inputs": list(getattr(module, "input_names", ("input_ids",))),
                "output": getattr(module, "output_name", None)}
    if factory:
        return {"factory": factory}
    return None


def save(module, directory: Path, shard_mb: int, architecture: dict, dtype: str | None = None) -> str:
    """Write ``module`` as capped shards beside its ``architecture`` (``architecture_of``);
    return the index name. ``dtype``: the 16-bit type a half-precision step left the
    weights in, if any."""
    from safetensors.torch import save_file

    cap = shard_mb * 2**20
    shards: list[dict] = [{}]
    size = 0
    saved = set()
    # One module's own parameters never span two shards: each pre-hook reads one file.
    for _, owned in _owners(module):
        names = [full for _, full in owned if full not in saved]  # a tied weight is saved once
        params = [module.get_parameter(n) for n in names]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        if shards[-1] and size + nbytes > cap:
            shards.append({})
            size = 0
        for name, param in zip(names, params):
            shards[-1][name] = param.detach().contiguous().cpu()
            saved.add(name)
        size += nbytes
    buffers = {name: b.detach().contiguous().cpu() for name, b in module.named_buffers()}
    shards[-1].update(buffers)
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total, "shard_mb": shard_mb, "buffers": sorted(buffers)},
             "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=1))
    architecture = dict(architecture)
    if dtype:
        architecture["dtype"] = dtype
    (directory / ARCHITECTURE_FILE).write_text(json.dumps(architecture, indent=1, default=str))
    return INDEX_FILE


def skeleton(architecture: dict):
    """The module ``architecture`` describes, on the meta device: shapes, no memory. A
    Hugging Face model comes in the wrapper that takes its inputs, as the checkpoint did."""
    import torch
    import transformers

    from ..registry.formats import hf_wrapper, import_factory

    if "factory" in architecture:
        with torch.device("meta"):
            module = import_factory(architecture["factory"])().eval()
    else:
        cls = getattr(transformers, architecture["class"], None)
        if cls is None or not hasattr(cls, "config_class"):
            raise ValueError(f"{architecture['class']} is not a transformers model class")
        config = cls.config_class.from_dict(architecture["config"])
        if architecture.get("attn_implementation"):
            config._attn_implementation = architecture["attn_implementation"]
        with torch.device("meta"):
            module = hf_wrapper(cls(config), architecture.get("inputs", ("input_ids",)), architecture.get("output"))
    if architecture.get("dtype"):  # computed in the type the weights were saved in
        module = module.to(getattr(torch, architecture["dtype"]))
    return module


class StreamedModule:
    """Runs the skeleton with each module's weights read from its shard just in time."""

    def __init__(self, directory: Path, device: str):
        import torch
        from safetensors import safe_open

        index = json.loads((directory / INDEX_FILE).read_text())
        architecture = json.loads((directory / ARCHITECTURE_FILE).read_text())
        self.module = skeleton(architecture)
        self.device = device
        self.dtype = getattr(torch, architecture["dtype"]) if architecture.get("dtype") else None
        weight_map = {name: directory / file for name, file in index["weight_map"].items()}
        for name in index["metadata"]["buffers"]:
            owner, _, local = name.rpartition(".")
            sub = self.module.get_submodule(owner) if owner else self.module
            with safe_open(str(weight_map[name]), framework="pt", device="cpu") as shard:
                sub._buffers[local] = shard.get_tensor(name).to(device)
        self.peak_bytes = 0
        self._live = 0
        for sub, names in _owners(self.module):
            sub.register_forward_pre_hook(self._loader(sub, names, weight_map))
            sub.register_forward_hook(self._dropper(sub, names))

    def _loader(self, sub, names: list[tuple[str, str]], weight_map: dict):
        import torch
        from safetensors import safe_open

        # Opened per call and closed at once: the shard's pages leave this process's
        # mappings with the module's weights (the page cache may keep them; it can drop
        # them). A module's own parameters share a shard; a tied one may sit in another.
        by_file: dict[str, list[tuple[str, str]]] = {}
        for local, full in names:
            by_file.setdefault(str(weight_map[full]), []).append((local, full))

        def hook(_module, _args):
            for path, wanted in by_file.items():
                with safe_open(path, framework="pt", device="cpu") as shard:
                    for local, full in wanted:
                        tensor = shard.get_tensor(full).to(self.device)
                        sub._parameters[local] = torch.nn.Parameter(tensor, requires_grad=False)
                        self._live += tensor.numel() * tensor.element_size()
            self.peak_bytes = max(self.peak_bytes, self._live)
        return hook

    def _dropper(self, sub, names):
        import torch

        def hook(_module, _args, _output):
            for local, _ in names:
                param = sub._parameters[local]
                self._live -= param.numel() * param.element_size()
                sub._parameters[local] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        return hook

    def __call__(self, *tensors):
        if self.dtype is not None:  # float inputs in the weights' type, as quantize.bf16 takes them
            tensors = tuple(t.to(self.dtype) if t.is_floating_point() else t for t in tensors)
        return self.module(*tensors)


def load(directory: Path, device: str, threads: int):
    """A ``Serving`` for the streamed artifact in ``directory``."""
    import torch

    torch.set_num_threads(threads)
    serving = Serving(StreamedModule(directory, device), device)
    serving.concurrent = False  # each call swaps weights in and out: one caller at a time
    return serving
