"""The PyTorch runtime: artifacts load with plain torch.

A ``torch.export`` program (``model.pt2``) where export can carry the model, and a
TorchScript archive (``model.pt``) where it cannot (torch.ao quantized modules), so
serving code needs ``torch.export.load`` or ``torch.jit.load`` and nothing of modelkiln.
A tensor-parallel variant is one ``torch.export`` program per rank plus ``plan.json``
(see ``sharded.py``); a compiled one is the program plus ``serving.json`` naming the
``torch.compile`` mode and options to apply once loaded (see ``compiled.py``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import ONNX, SHARDED, SPARSE24, STREAMED, TORCH, ModelHandle, Runtime
from . import decoding, derived, fusion, hf_folder, semistructured, sharded, streamed
from .kernels import int4
from .compiled import compile_loaded, serving_entry
from .serving import Serving
from .shapes import dynamic_shapes, example_args, tracing_attention

EXPORT_FILE = "model.pt2"
SCRIPT_FILE = "model.pt"
# How serving code must load the program when not just torch.export.load: the
# compile.inductor mode, and a causal LM's static-cache decoding program.
SERVING_FILE = "serving.json"
# A model's note: the decode batch sizes and prefill lengths of the target it is built for.
DECODE_SHAPES = "decode_shapes"
# A model's note: the blob store its weight files are linked from (StepContext.blob_dir).
BLOB_DIR = "blob_dir"


# A layer's attribute holding what it computed from its stored weights at its first call
# (an unpacked weight): filled at run time, emptied before a TorchScript archive is saved.
RUN_TIME_CACHE = "weight_cache"


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch on cpu or cuda; artifact torch.export model.pt2 or TorchScript model.pt"
    devices = ("cpu", "cuda")
    form = TORCH

    def convert(self, model, context):
        if model.form == ONNX:  # its graph imported, where the importer takes every operator
            from .onnx_import import imported

            model = imported(model, context)
        if model.form not in (TORCH, SHARDED, STREAMED):
            raise StepNotApplicable(f"an {model.form} model has no PyTorch module to serve with torch")
        # What a causal LM's decoding programs are exported for: the target's batch sizes
        # and prompt lengths (decoding.py).
        model.notes[DECODE_SHAPES] = {"batch_sizes": list(context.decode_batch_sizes),
                                      "prefill_tokens": list(context.prefill_tokens)}
        model.notes[BLOB_DIR] = str(context.blob_dir) if context.blob_dir is not None else None
        if context.device == "cpu":
            return model
        # Exported where it will run: torch.export pins the device of every cast it
        # records (``x.to(dtype)``), so a program traced on the CPU fails on a GPU.
        if model.form == STREAMED:  # weights go to the device module by module, as it runs
            return model
        if model.form == TORCH:
            if model.notes.get(SPARSE24):
                _check_sparse_weights(model.obj)
            return ModelHandle(TORCH, model.obj.to(context.device), model.inputs, dict(model.notes))
        for rank, module in enumerate(model.obj.ranks):  # rank r serves on cuda:r
            model.obj.ranks[rank] = module.to(f"cuda:{rank}")
        return model

    def save(self, model, directory):  # noqa: C901 - over the complexity bound, not yet split
        import torch

        if model.form == SHARDED:
            return sharded.save(model, directory)
        if model.form == STREAMED:
            return streamed.save(model.obj, directory, model.notes["shard_mb"], model.notes["stream_architecture"],
                                 model.notes.get("stream_dtype"))
        args = example_args(model)
        export_error = None
        # A causal LM's weights are stored once, as the Hugging Face folder LLM servers
        # load; its programs keep only what that folder does not hold (derived.py).
        lm = decoding.find_causal_lm(model.obj) if model.form == TORCH else None
        blobs = Path(model.notes[BLOB_DIR]) if model.notes.get(BLOB_DIR) else None
        weights, stored = hf_folder.save(lm, directory, blobs=blobs) if lm is not None else (None, {})

        def without_stored(program, prefix: str) -> dict:
            if not stored or not derived.placeholders_survive():
                return {}
            return derived.strip(program, stored, derived.kernel_sources(lm, prefix))

        prefix = next((f"{name}." if name else "" for name, m in model.obj.named_modules() if m is lm), "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model.notes.get("serialize") != "torchscript":
                try:
                    with tracing_attention():
                        program = torch.export.export(model.obj, args,
                                                      dynamic_shapes=dynamic_shapes(model.obj, model.inputs))
                        program, fused = fusion.fused_program(program, args, {},
                                                              lambda m: dynamic_shapes(m, model.inputs))
                except Exception as exc:
                    if model.notes.get("compile"):
                        raise StepNotApplicable(f"torch.compile needs a torch.export program: {exc}") from None
                    export_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                else:
                    sources = without_stored(program, prefix)
                    torch.export.save(program, str(directory / EXPORT_FILE))
                    serving = self._serving(model, directory, without_stored)
                    if fused:
                        serving["fused_linears"] = fused
                    if sources:
                        serving[decoding.PROGRAM_WEIGHTS] = sources
                    if weights:
                        serving["weights"] = weights
                    if serving:
                        (directory / SERVING_FILE).write_text(json.dumps(serving, indent=2))
                    return EXPORT_FILE
                # fall back to TorchScript below
            with torch.inference_mode():
                traced = torch.jit.trace(model.obj, args, check_trace=False)
            for module in traced.modules():  # what the trace's own call left in a layer's cache
                if getattr(module, RUN_TIME_CACHE, None) is not None:
                    setattr(module, RUN_TIME_CACHE, None)
            torch.jit.save(traced, str(directory / SCRIPT_FILE))
        if export_error or weights:
            # Why the forward pass is TorchScript, said beside it rather than silently; and a
            # causal LM still gets its decoding program (a separate export), without which
            # the variant has no decode figures.
            serving = {"export_error": export_error} if export_error else {}
            decode = self._decoding(model, directory, without_stored) if export_error else None
            if decode:
                serving["decode"] = decode
            if weights:
                serving["weights"] = weights
            (directory / SERVING_FILE).write_text(json.dumps(serving, indent=2))
        return SCRIPT_FILE

    @staticmethod
    def _serving(model, directory, strip=None) -> dict:
        """What serving code needs besides the program: the compile mode, and for a causal
        language model the static-cache decoding program (or why there is none)."""
        serving = {}
        if model.notes.get("compile"):
            serving["compile"] = serving_entry(model.notes["compile"])
        if model.notes.get(SPARSE24):
            serving[semistructured.SERVING_KEY] = {
                "weights": semistructured.patterned(model.obj),
                "load": "torch.sparse.to_sparse_semi_structured on every 2-D 16-bit weight with at most two "
                        "non-zeros in each four along its rows, then one CUDA graph per input shape (compiled "
                        "with triton.cudagraphs off)",
            }
        if model.notes.get(int4.SERVING_KEY):
            serving[int4.SERVING_KEY] = int4.serving_entry()
        decode = TorchRuntime._decoding(model, directory, strip)
        if decode:
            serving["decode"] = decode
        return serving

    @staticmethod
    def _decoding(model, directory, strip=None) -> dict | None:
        """``serving.json``'s entry for a causal LM's static-cache decoding program (or why
        there is none); None for any other model."""
        shapes = model.notes.get(DECODE_SHAPES) or {}
        return decoding.save_decoders(model.obj, directory, strip, shapes.get("batch_sizes", (1,)),
                                      shapes.get("prefill_tokens", ()))

    def weights(self, directory):
        """A causal LM's: its Hugging Face folder (hf_folder.py), or why it has none."""
        if not (directory / SERVING_FILE).exists():
            return None
        return json.loads((directory / SERVING_FILE).read_text()).get("weights")

    def load(self, directory: Path, file: str, device: str, threads: int) -> Callable[[dict], Any]:
        import torch

        if file == sharded.PLAN_FILE:
            return sharded.load(directory, device, threads)
        if file == streamed.INDEX_FILE:
            return streamed.load(directory, device, threads)
        torch.set_num_threads(threads)
        serving = json.loads((directory / SERVING_FILE).read_text()) if (directory / SERVING_FILE).exists() else {}
        decode = serving.get("decode", {})
        # The weights its programs left to the variant's Hugging Face folder (derived.py).
        stored = (hf_folder.load_state(directory)
                  if decoding.PROGRAM_WEIGHTS in serving or decoding.PROGRAM_WEIGHTS in decode else {})

        # One copy of each weight on the device, whichever programs read it.
        shared: dict = {}

        if int4.SERVING_KEY in serving:  # its programs call modelkiln's own kernel: it must exist first
            int4.register_op()

        def program_of(name: str, sources: dict | None):
            program = torch.export.load(str(directory / name))
            if sources:
                derived.fill(program, sources, stored, device, shared)
            return program.module().to(device)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if file.endswith(".pt2"):
                module = program_of(file, serving.get(decoding.PROGRAM_WEIGHTS))
                sparse = semistructured.SERVING_KEY in serving and device.startswith("cuda")
                if sparse:
                    semistructured.sparsify(module)
                if "compile" in serving:
                    compile_as = serving["compile"]
                    module = compile_loaded(module, semistructured.uncompiled_graphs(compile_as) if sparse
                                            else compile_as)
                if sparse:
                    module = semistructured.CudaGraphs(module)
            else:
                module = torch.jit.load(str(directory / file), map_location=device)
                module.eval()
            if "file" in decode:
                def decoder_of(entry: dict):
                    program = program_of(entry["file"], entry.get(decoding.PROGRAM_WEIGHTS))
                    return compile_loaded(program, serving["compile"]) if "compile" in serving else program

                batched = {int(batch): decoder_of(entry) for batch, entry in (decode.get("batches") or {}).items()
                           if "file" in entry}
                prefill = decode.get("prefill") or {}
                return Serving(module, device, decoder_of(decode), decode["vocab_size"], batched,
                               (decoder_of(prefill), prefill["tokens"]) if "file" in prefill else None)
        return Serving(module, device)


def _check_sparse_weights(module) -> None:
    """A 2:4-sparse model must reach a GPU in 16 bits: the sparse kernels take no float32."""
    import torch

    if any(w.dtype == torch.float32 and semistructured.kernels_take(w, any_dtype=True) for w in module.parameters()):
        raise StepNotApplicable("prune.sparse24: the 2:4 kernels take 16-bit weights and these are float32; put "
                                "quantize.bf16 (or fp16) after prune.sparse24 in the recipe")


@hookimpl
def kiln_runtimes():
    return [TorchRuntime()]
