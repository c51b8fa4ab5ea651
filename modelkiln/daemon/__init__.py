"""The service process: watcher, ingest, planner, leasing, executor, promotion, the loop.
What runs in a worker process lives in ``modelkiln.pipeline``."""
