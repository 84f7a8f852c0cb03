"""What an expert slot holds in memory: the *parts* of an MWQ expert, and how they are built.

A part is a run of MWQ components ``lo..hi`` held as one MLX affine-quantized
tensor per projection (``weight`` uint32, ``scales``, ``biases``, and the expert's
output ``bias`` where the family has one), so computing it is one ``gather_qmm``.
Two layouts:

* ``planes``: one part per stored component (base, plane 1, ...). Level k sums
  parts 0..k, one pass each; an expert's planes are resident independently.
* ``levels``: one part per level, components 0..k packed into one
  ``level_bits(k)``-bit tensor, so level k costs one pass like a plain k-bit
  tensor. Exact only for stores fitted with ``nested`` (each component's scale is
  its level's scale times a power of two, checked per group when packing):
  codes concatenate, the scale is the last component's, the biases add up.

Binary (1-bit) planes run as MLX 2-bit (code b, scale 2s, bias -s) in ``planes``
and as one more code bit in ``levels``. Packing is numpy, done by loader threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import mwq
from .packing import binary_to_2bit, concat_codes
from .store.format import StoreError

LAYOUTS = ("planes", "levels")


@dataclass(frozen=True)
class Part:
    """Components ``lo..hi`` as one tensor of ``bits`` (an MLX width)."""

    index: int
    lo: int
    hi: int
    bits: int

    @property
    def components(self) -> range:
        return range(self.lo, self.hi + 1)


@dataclass(frozen=True)
class Layout:
    """The parts every expert slot pool holds, and which parts compute each level."""

    kind: str
    parts: tuple[Part, ...]

    def cover(self, level: int) -> tuple[int, ...]:
        """Indices of the parts whose sum is ``level``."""
        if self.kind == "planes":
            return tuple(range(level + 1))
        return (level,)

    @property
    def num_levels(self) -> int:
        return len(self.parts)


def make_layout(kind: str, spec: mwq.MWQSpec, levels: int | None = None) -> Layout:
    """The ``kind`` layout of ``spec`` for levels 0..``levels``-1 (default: all)."""
    if kind not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {kind!r}")
    n = spec.num_levels if levels is None else levels
    if kind == "planes":
        parts = [Part(c, c, c, max(2, spec.component_bits(c))) for c in range(n)]
    else:
        for level in range(n):
            if spec.level_bits(level) not in mwq.MLX_BITS:
                raise ValueError(f"level {level} has {spec.level_bits(level)} bits, which MLX's "
                                 f"kernels do not run ({mwq.MLX_BITS}): use the planes layout")
        parts = [Part(level, 0, level, spec.level_bits(level)) for level in range(n)]
    return Layout(kind, tuple(parts))


def levels_possible(spec: mwq.MWQSpec, nested: bool) -> bool:
    """Whether the ``levels`` layout can run a store: nested fit, every level an MLX width."""
    return nested and all(spec.level_bits(k) in mwq.MLX_BITS for k in range(spec.num_levels))


# -- slot tensors ---------------------------------------------------------------------
def projections(specs) -> list[str]:
    """Projection names of a component block's tensor specs, in file order."""
    seen = []
    for s in sorted(specs, key=lambda s: s.offset):
        proj = s.name.rsplit(".", 1)[0]
        if proj not in seen:
            seen.append(proj)
    return seen


def slot_tensors(part: Part, base_specs: list, group_size: int) -> list[tuple[str, tuple, bool]]:
    """(name, shape, is_float) of each tensor one slot of ``part`` holds, given the
    tensor specs of the base component's block: per projection the packed codes
    (uint32, ``part.bits`` wide), scales and biases (activation dtype), and the
    expert's output bias if component 0 is in the part and stores one."""
    base = {s.name: s for s in base_specs}
    out = []
    for proj in projections(base_specs):
        groups = base[f"{proj}.scales"].shape
        in_dims = groups[1] * group_size
        out.append((f"{proj}.weight", (groups[0], in_dims * part.bits // 32), False))
        out.append((f"{proj}.scales", tuple(groups), True))
        out.append((f"{proj}.biases", tuple(groups), True))
        if part.lo == 0 and f"{proj}.bias" in base:
            out.append((f"{proj}.bias", tuple(base[f"{proj}.bias"].shape), True))
    return out


# -- building a slot from stored blocks --------------------------------------------------
def build_part(part: Part, spec: mwq.MWQSpec, blocks: dict[int, dict[str, np.ndarray]],
               where: str, prefix: tuple[Part, dict[str, np.ndarray]] | None = None
               ) -> dict[str, np.ndarray]:
    """The tensors of one slot of ``part`` (float ones as float32) from each component's
    stored block (``blocks[c]``: name -> array, as the store reads them).

    ``prefix``: (a lower level's part, its slot tensors as float32/uint32): the
    components it holds are taken from it, only the ones above it from ``blocks``
    (a level raised in place of read again)."""
    if part.lo == part.hi:
        return _single(part, spec.component_bits(part.lo), blocks[part.lo])
    return _packed(part, spec, blocks, where, prefix)


def _single(part: Part, bits: int, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for proj in projections_of(block):
        w = block[f"{proj}.weight"]
        s = block[f"{proj}.scales"].astype(np.float32)
        if bits == 1:  # binary plane: MLX 2-bit, code b, scale 2s, bias -s
            out[f"{proj}.weight"] = binary_to_2bit(w)
            out[f"{proj}.scales"], out[f"{proj}.biases"] = 2 * s, -s
        else:
            out[f"{proj}.weight"] = w
            out[f"{proj}.scales"] = s
            out[f"{proj}.biases"] = block[f"{proj}.biases"].astype(np.float32)
        if part.lo == 0 and f"{proj}.bias" in block:
            out[f"{proj}.bias"] = block[f"{proj}.bias"].astype(np.float32)
    return out


def projections_of(block: dict[str, np.ndarray]) -> list[str]:
    """Projection names in a block dict, in insertion order."""
    seen = []
    for name in block:
        proj = name.rsplit(".", 1)[0]
        if proj not in seen:
            seen.append(proj)
    return seen


def _packed(part: Part, spec: mwq.MWQSpec, blocks: dict[int, dict[str, np.ndarray]],
            where: str, prefix: tuple[Part, dict[str, np.ndarray]] | None = None
            ) -> dict[str, np.ndarray]:
    """Components lo..hi as one tensor: codes concatenated (component lo in the high
    bits), scale = the last component's step, biases summed. Each component's affine
    scale must be that step times 2^(bits below it) in every group, or zero (a plane
    the fit switched off there, which then contributes nothing). A prefix (a lower
    level already packed) stands for its components: its step and bias sum are theirs."""
    first = part.lo if prefix is None else prefix[0].hi + 1
    pieces = [(c, spec.component_bits(c)) for c in range(first, part.hi + 1)]
    bits = ([prefix[0].bits] if prefix else []) + [b for _, b in pieces]
    shifts = [sum(bits[i + 1:]) for i in range(len(bits))]
    base = blocks[part.lo] if prefix is None else prefix[1]
    out = {}
    for proj in projections_of(base):
        scales, biases, words = [], [], []
        if prefix is not None:
            words.append(prefix[1][f"{proj}.weight"])
            scales.append(prefix[1][f"{proj}.scales"].astype(np.float32))
            biases.append(prefix[1][f"{proj}.biases"].astype(np.float32))
        for c, b in pieces:
            blk = blocks[c]
            s = blk[f"{proj}.scales"].astype(np.float32)
            if b == 1:  # s·(2q-1) = 2s·q - s
                scales.append(2 * s)
                biases.append(-s)
            else:
                scales.append(s)
                biases.append(blk[f"{proj}.biases"].astype(np.float32))
            words.append(blk[f"{proj}.weight"])
        step = scales[0] / np.float32(2.0 ** shifts[0])  # exact: a power of two
        if prefix is not None:  # a slot's prefix holds scales rounded to the activation
            for j in range(len(scales) - 1, 0, -1):  # dtype: take the step from the disk
                step = np.where(scales[j] != 0, scales[j] / np.float32(2.0 ** shifts[j]), step)
        bias = np.zeros_like(step)
        for j, (s, z, shift) in enumerate(zip(scales, biases, shifts)):
            want = step * np.float32(2.0 ** shift)
            off = s == 0
            # the prefix was checked when it was packed; here it may differ from the
            # disk's step by its rounding to a 16-bit activation dtype (< 2^-8 relative)
            ok = (s == want) if (prefix is None or j) else (np.abs(s - want) <= np.abs(want) / 128)
            if not np.all(ok | off):
                bad = np.argwhere(~ok & ~off)[0]
                raise StoreError(
                    f"{where}: {proj} group {tuple(bad)}: component scales are not nested "
                    f"({s[tuple(bad)]} vs {want[tuple(bad)]}), so levels cannot be packed into "
                    "one tensor: this store was not fitted with --method nested; load it "
                    "with layout='planes'")
            if off.any():  # the plane adds nothing there: its codes must not either
                per_group = words[j].shape[-1] // off.shape[-1]
                words[j] = words[j] * np.repeat(~off, per_group, axis=-1)
            bias += np.where(off, 0.0, z)
        out[f"{proj}.weight"] = concat_codes(list(zip(words, bits)), part.bits)
        out[f"{proj}.scales"] = step
        out[f"{proj}.biases"] = bias
        if f"{proj}.bias" in base:
            out[f"{proj}.bias"] = base[f"{proj}.bias"].astype(np.float32)
    return out
