"""Targets: the runtimes that serve models (onnxruntime, torch), the latency harness,
and quality evaluation against the original checkpoint."""
