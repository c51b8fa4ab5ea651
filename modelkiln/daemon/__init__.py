"""The service: watcher, reconciler (ingest), scheduler, executor, jobs, promotion, the loop."""
