"""Human sizes and process memory readings."""

from __future__ import annotations

import re
import resource
import sys

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes in a human size: ``6GB``, ``512 MiB``, ``1.5g``, ``1048576`` (binary units)."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return int(text)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 6GB, 512MB or 1.5GiB")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_bytes(n: float) -> str:
    """``1.50 GiB`` style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far.

    On Linux this is VmHWM of /proc/self/status: ``ru_maxrss`` there also counts
    the parent's memory at the time of fork+exec, so a small child of a big
    parent would report the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
