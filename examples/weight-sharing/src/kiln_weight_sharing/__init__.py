"""Weight sharing for modelkiln: see ``plugin.py``."""

__version__ = "0.1.0"
