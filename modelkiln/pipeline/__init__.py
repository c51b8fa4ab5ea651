"""What runs inside a worker process, never in the service: inspect a checkpoint, build a
variant, measure it, time a run-off. Each phase takes a JSON-able spec and returns a
JSON-able result; ``worker.py`` is the child's entry point."""
