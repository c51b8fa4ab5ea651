"""How sizes read in tables: the CLI's listings and the HTML report agree."""

from __future__ import annotations


def format_size(value) -> str:
    """Bytes as B, KiB, MiB or GiB; "" for None."""
    if value is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""
