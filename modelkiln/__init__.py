"""modelkiln: a daemon that turns each new checkpoint into the fastest variant that keeps its quality."""

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]

from .plugins import hookimpl
