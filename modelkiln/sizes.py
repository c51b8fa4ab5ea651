"""How sizes, spans of time and untrusted names read in tables and logs: the CLI, the
report and the daemon agree."""

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


def format_duration(seconds: float | None) -> str:
    """``seconds`` as an operator reads a span: "45 s", "3m05s", "1h02m"."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes: a file name or a reason from a
    crafted folder can neither move the cursor nor start a fake row of a table."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
