"""On-disk packing of MWQ components and their MLX form.

Codes are packed as one LSB-first bit stream along the input dim, stored as
little-endian uint32 words: for affine widths 2,3,4,5,6,8 this is exactly
MLX's own packed layout (``mx.quantize``); binary planes use 1 bit/weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from .mwq import Component


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> uint32 words [..., n * bits / 32]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n = codes.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    if bits in (1, 2, 4, 8):
        per = 32 // bits
        c = codes.reshape(*codes.shape[:-1], n // per, per).astype(np.uint32)
        shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
        return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = stream.reshape(*codes.shape[:-1], n * bits)
    words = np.packbits(stream, axis=-1, bitorder="little")
    return np.ascontiguousarray(words).view("<u4").astype(np.uint32)


def unpack_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint32 [..., n*bits/32] -> uint8 [..., n]."""
    words = np.ascontiguousarray(words, dtype="<u4")
    if words.shape[-1] * 32 != n * bits:
        raise ValueError(f"{words.shape[-1]} words cannot hold {n} codes of {bits} bits")
    if bits in (1, 2, 4, 8):
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
        c = (words[..., None] >> shifts) & np.uint32(2**bits - 1)
        return c.reshape(*words.shape[:-1], n).astype(np.uint8)
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*words.shape[:-1], n, bits).astype(np.uint8)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def pack_component(c: "Component") -> dict[str, np.ndarray]:
    """{"weight": uint32, "scales": float16, "biases": float16 (affine only)}."""
    out = {
        "weight": pack_codes(c.codes, c.bits),
        "scales": c.scales.astype(np.float16),
    }
    if c.bits != 1:
        out["biases"] = c.biases.astype(np.float16)
    return out


def unpack_component(
    packed: dict[str, np.ndarray], bits: int, shape: tuple[int, int]
) -> "Component":
    """Exact inverse of :func:`pack_component`."""
    from .mwq import Component

    out, n = shape
    w = np.asarray(packed["weight"])
    if w.shape != (out, n * bits // 32):
        raise ValueError(f"packed weight shape {w.shape} does not fit {shape} at {bits} bits")
    biases = None
    if bits != 1:
        if "biases" not in packed:
            raise ValueError(f"an affine ({bits}-bit) component needs 'biases'")
        biases = np.asarray(packed["biases"]).astype(np.float32)
    return Component(
        bits=bits,
        codes=unpack_codes(w, bits, n),
        scales=np.asarray(packed["scales"]).astype(np.float32),
        biases=biases,
    )


def _spread_bits(x: np.ndarray) -> np.ndarray:
    """Put bit i of a 16-bit value at bit 2i (zeros between)."""
    x = x & np.uint32(0xFFFF)
    x = (x | (x << np.uint32(8))) & np.uint32(0x00FF00FF)
    x = (x | (x << np.uint32(4))) & np.uint32(0x0F0F0F0F)
    x = (x | (x << np.uint32(2))) & np.uint32(0x33333333)
    x = (x | (x << np.uint32(1))) & np.uint32(0x55555555)
    return x


_SPREAD = ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555))


def widen(words: np.ndarray, bits: int) -> np.ndarray:
    """Packed ``bits``-bit codes [..., k] -> the same codes as ``2*bits``-bit fields [..., 2k]
    (each field's value in its low half), on whole words: no per-weight arrays."""
    words = np.asarray(words, dtype=np.uint32)
    halves = []
    for half in (words & np.uint32(0xFFFF), words >> np.uint32(16)):
        x = half
        for shift, mask in _SPREAD:
            if shift >= bits:
                x = (x | (x << np.uint32(shift))) & np.uint32(mask)
        halves.append(x)
    return np.stack(halves, axis=-1).reshape(*words.shape[:-1], 2 * words.shape[-1])


def concat_codes(parts: list[tuple[np.ndarray, int]], bits: int) -> np.ndarray:
    """Packed codes Q = sum_j c_j << (bits of the parts after j), ``bits`` wide, from packed
    parts [(words, part bits), ...] (the first part is the high bits). Word operations
    when every width is a power of two; else through per-weight codes."""
    if all(b in (1, 2, 4, 8) for _, b in parts) and bits in (2, 4, 8):
        out, shift = None, bits
        for words, b in parts:
            shift -= b
            while b < bits:
                words, b = widen(words, b), 2 * b
            words = words << np.uint32(shift) if shift else words
            out = words if out is None else out | words
        return out
    n = parts[0][0].shape[-1] * 32 // parts[0][1]
    q, shift = np.zeros((*parts[0][0].shape[:-1], n), dtype=np.uint16), bits
    for words, b in parts:
        shift -= b
        q |= unpack_codes(words, b, n).astype(np.uint16) << shift
    return pack_codes(q.astype(np.uint8), bits)


def binary_to_2bit(words: np.ndarray) -> np.ndarray:
    """1-bit packed words [..., k] -> MLX 2-bit packed words [..., 2k] (code b -> b)."""
    words = np.asarray(words, dtype=np.uint32)
    lo = _spread_bits(words)
    hi = _spread_bits(words >> np.uint32(16))
    return np.stack([lo, hi], axis=-1).reshape(*words.shape[:-1], 2 * words.shape[-1])


def component_to_mlx(
    packed: dict[str, np.ndarray], bits: int, dtype=mx.float32, *, native_1bit: bool = False
) -> tuple[mx.array, mx.array, mx.array, int]:
    """(weight, scales, biases, bits) for ``mx.gather_qmm`` / ``mx.quantized_matmul``
    (transpose=True).  Leading batch dims ([E, out, words]) pass through.  A binary
    plane becomes MLX 2-bit: code b keeps b, scale 2s, bias -s (exact in float16).
    ``native_1bit``: keep it 1-bit (MLX's 1-bit layout is ours; half the memory;
    checked on the CPU backend of mlx 0.32.4 only)."""
    w = np.asarray(packed["weight"])
    s = np.asarray(packed["scales"]).astype(np.float32)
    if bits == 1:
        return (
            mx.array(w.astype(np.uint32) if native_1bit else binary_to_2bit(w)),
            mx.array(2 * s).astype(dtype),
            mx.array(-s).astype(dtype),
            1 if native_1bit else 2,
        )
    return (
        mx.array(w.astype(np.uint32)),
        mx.array(s).astype(dtype),
        mx.array(np.asarray(packed["biases"]).astype(np.float32)).astype(dtype),
        bits,
    )
