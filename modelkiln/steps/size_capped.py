"""Built-in step ``shard.size_capped``: a model bigger than the target's memory budget,
written as size-capped safetensors shards with an index and streamed while it runs.

Applies on a target with ``memory_mb`` set when the model's weights exceed it; otherwise
it is skipped with the reason (nothing to gain: the whole model fits). The torch runtime
writes the shards (``targets/streamed.py``) and serves the variant by reading each
module's weights from its shard just before that module runs, so the weights resident at
any moment are one module's. Serving rebuilds the module without weights: a Hugging Face
checkpoint from its config, weights built by a configured factory from that factory. So
the module must still be what that rebuilds, and the step goes first in a recipe or
after steps that keep its shapes (or update a Hugging Face config with them): after
``quantize.bf16`` / ``quantize.fp16`` the shards hold 16-bit weights (half the bytes
resident and read per call) and the skeleton is rebuilt in that type.
"""

from __future__ import annotations

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import STREAMED, TORCH, ModelHandle, Param, Step
from .quantize import unwrap_half_precision


class SizeCapped(Step):
    name = "shard.size_capped"
    description = ("a model over the target's memory_mb: size-capped safetensors shards + index, "
                   "each module's weights read just before it runs")
    params = (Param("shard_mb", int, 0, "largest shard in MiB; 0: a quarter of the target's memory_mb"),)
    forms = {"torch": TORCH}

    def apply(self, model, params, context):
        from ..targets.streamed import architecture_of, skeleton

        budget = context.memory_mb
        if budget <= 0:
            raise StepNotApplicable("the target sets no memory_mb budget")
        module = model.obj
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        if weights <= budget * 2**20:
            raise StepNotApplicable(f"the model's weights ({weights / 2**20:.1f} MiB) fit the target's "
                                    f"memory_mb ({budget} MiB): nothing to stream")
        largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                      for m in module.modules())
        if largest > budget * 2**20:
            raise StepNotApplicable(f"its largest module holds {largest / 2**20:.1f} MiB of weights, over the "
                                    f"target's memory_mb ({budget} MiB): streaming by module cannot fit it")
        module, dtype = unwrap_half_precision(module)  # after quantize.bf16 / fp16: stream what it wraps
        architecture = architecture_of(module, model.notes.get("factory"))
        if architecture is None:
            raise StepNotApplicable("streaming rebuilds the model without its weights, from a Hugging Face "
                                    "config or the factory the config names; this model has neither")
        shard_mb = params["shard_mb"] or max(1, budget // 4)
        if shard_mb < 1:
            raise StepNotApplicable(f"{self.name}: shard_mb must be at least 1, got {shard_mb}")
        try:
            rebuilt = {n: tuple(p.shape) for n, p in skeleton(architecture).named_parameters()}
        except Exception as exc:
            raise StepNotApplicable(f"the architecture cannot be rebuilt from its config or factory ({exc})") from None
        own = {n: tuple(p.shape) for n, p in module.named_parameters()}
        if rebuilt != own:
            raise StepNotApplicable("a step before this one changed the model's shapes; its config or factory "
                                    "no longer rebuilds it: put shard.size_capped first")
        # What the policy holds against the budget: serving keeps one module's weights.
        context.record.update(weights_mib=round(weights / 2**20, 2), memory_mb=budget, shard_mb=shard_mb,
                              resident_weights_mib=round(largest / 2**20, 2))
        notes = {**model.notes, "shard_mb": shard_mb, "stream_architecture": architecture}
        if dtype is not None:
            notes["stream_dtype"] = str(dtype).removeprefix("torch.")
            context.record["dtype"] = notes["stream_dtype"]
        return ModelHandle(STREAMED, module, model.inputs, notes)


@hookimpl
def kiln_steps():
    return [SizeCapped()]
