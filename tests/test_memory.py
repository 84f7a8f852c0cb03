"""Sizes: one convention (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary), exact bytes."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe_mlx.memory import format_bytes, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("6GB", 6_000_000_000),
    ("6gb", 6_000_000_000),
    ("6 GB", 6_000_000_000),
    ("6GiB", 6 * 1024**3),
    ("6gib", 6 * 1024**3),
    ("1MB", 1_000_000),
    ("1MiB", 1_048_576),
    ("512kB", 512_000),
    ("512KiB", 524_288),
    ("2TB", 2_000_000_000_000),
    ("2TiB", 2 * 1024**4),
    ("1.5GiB", 1_610_612_736),
    ("4.35GB", 4_350_000_000),  # 4.35 * 1e9 in floats is 4349999999.999999
    (".5MB", 500_000),
    ("100B", 100),
    ("  7 mb ", 7_000_000),
])
def test_units(text, expected):
    assert parse_size(text) == expected


def test_int_is_bytes():
    assert parse_size(12345) == 12345
    assert parse_size(np.int64(1 << 40)) == 1 << 40


@pytest.mark.parametrize("text,hint", [
    ("6", "add a unit: 6GB or 6GiB"),
    ("6000000000", "add a unit"),
    ("6G", "6GB (decimal) or 6GiB (binary)"),
    ("512m", "512MB (decimal) or 512MiB (binary)"),
    ("0GB", "positive"),
    ("-1GB", "positive"),
    ("0.0001B", "positive"),
    ("6XB", "unknown unit"),
    ("abc", "cannot read"),
    ("", "cannot read"),
    ("1.2.3GB", "cannot read"),
    ("GB", "cannot read"),
])
def test_refused_with_a_hint(text, hint):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert hint in str(info.value)


@pytest.mark.parametrize("value", [0, -5, True, 1.5, None])
def test_refused_values(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_format():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**4) == "3.00 TiB"
    assert format_bytes(1_500_000, binary=False) == "1.50 MB"
    assert format_size(6_000_000_000) == "6.00 GB (5.59 GiB)"
    assert format_size(6 * 1024**3) == "6.44 GB (6.00 GiB)"


@pytest.mark.parametrize("n", [1000, 123_456_789, 6 * 1024**3, 7 * 10**12])
def test_formatted_sizes_read_back(n):
    """What the runtime prints (e.g. 'the smallest budget that works is ...') is accepted back."""
    for binary in (True, False):
        text = format_bytes(n, binary=binary)
        assert abs(parse_size(text) - n) <= 0.005 * n, text
