"""Built-in plugins that react to the daemon's events (``webhook``)."""
