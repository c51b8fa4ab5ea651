"""A torch artifact loaded for a device, as the measurement calls it: numpy in, numpy out.

The torch runtime's loaders (``torchrt``) and the streamed shard's (``streamed``) both
hand one back, so it lives apart from either.
"""

from __future__ import annotations

from . import decoding


class Serving:
    """An artifact loaded for ``device``: numpy in, numpy out, as a caller sees it; on a
    GPU it times itself on the device (inputs already there) with CUDA events."""

    # Whether several callers may call it at once (measured under load); a loader whose
    # artifact cannot take that says so on the instance.
    concurrent: bool = True

    def __init__(self, module, device: str, decoder=None, vocab_size: int = 0, batched=None, prefill=None):
        self.module = module
        self.device = device
        if device.startswith("cuda"):
            # On the CPU the harness's wall clock is right; a GPU needs its own events.
            self.time_runs = self._time_cuda
        if decoder is not None:
            # A causal language model: prefill and per-token decode with its KV cache.
            self.time_decoding = lambda: decoding.time_decoding(decoder, vocab_size, device, batched=batched,
                                                                prefill=prefill)

    def _tensors(self, inputs: dict):
        import torch

        return [torch.from_numpy(v).to(self.device) for v in inputs.values()]

    def __call__(self, inputs: dict):
        import torch

        with torch.inference_mode():
            out = self.module(*self._tensors(inputs))
        return out.float().cpu().numpy()

    def _time_cuda(self, inputs: dict, **settings) -> dict:
        import torch

        from .harness import time_calls

        tensors = self._tensors(inputs)

        def call():
            with torch.inference_mode():
                self.module(*tensors)

        return time_calls(call, self.device, **settings)
