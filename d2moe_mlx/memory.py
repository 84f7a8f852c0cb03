"""Human sizes and process memory readings.

One convention for sizes everywhere (``--memory``, ``load(memory_budget=...)``):
``KB MB GB TB`` are decimal (10^3, 10^6, 10^9, 10^12 bytes) and ``KiB MiB GiB TiB``
binary (2^10 ... 2^40), case-insensitive; ``B`` is bytes. A number needs its unit,
and a bare ``K``/``M``/``G``/``T`` is refused: some tools read ``6G`` as 6 * 10^9,
others as 6 * 2^30, and 7% of a memory budget matters. An ``int`` is bytes.
"""

from __future__ import annotations

import numbers
import re
import resource
import sys
from decimal import Decimal

DECIMAL_UNITS = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_UNITS = {name.lower(): n for name, n in (*DECIMAL_UNITS, *BINARY_UNITS, ("B", 1))}
_SIZE = re.compile(r"^\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size: ``6GB`` (6 * 10^9), ``6GiB`` (6 * 2^30), ``512 mb``, ``1.5GiB``;
    an int is bytes. Refuses a number without a unit, ``6G`` (ambiguous), and sizes <= 0."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text} bytes")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"a size is a text such as '6GB' or an int (bytes), got {text!r}")
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 6GB (10^9 bytes) or 6GiB (2^30 bytes)")
    number, unit = match.groups()
    if not unit:
        raise ValueError(f"{text!r} has no unit; add a unit: {number}GB or {number}GiB")
    if unit.lower() in ("k", "m", "g", "t"):
        u = unit.upper()
        raise ValueError(f"{text!r}: {u} alone is ambiguous (10^n or 2^n bytes); "
                         f"write {number}{u}B (decimal) or {number}{u}iB (binary)")
    if unit.lower() not in _UNITS:
        names = ", ".join(name for name, _ in (*DECIMAL_UNITS, *BINARY_UNITS))
        raise ValueError(f"{text!r}: unknown unit {unit!r}; use one of {names} or B")
    size = int(Decimal(number) * _UNITS[unit.lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def format_bytes(n: float, binary: bool = True) -> str:
    """``1.50 GiB`` style text for a byte count (``1.61 GB`` with ``binary=False``)."""
    for unit, size in BINARY_UNITS if binary else DECIMAL_UNITS:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_size(n: int) -> str:
    """A byte count in both conventions: ``6.00 GB (5.59 GiB)``."""
    return f"{format_bytes(n, binary=False)} ({format_bytes(n)})"


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
