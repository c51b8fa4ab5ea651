"""The built-in steps (quantize, prune, distill, shard, compile) and the helpers they
share (training, tuning, smoothing). Each module is an ordinary plugin: it contributes
its steps through ``kiln_steps`` and is registered from the entry-point group."""
