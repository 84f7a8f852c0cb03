"""MWQ components from an already-quantized expert (an mlx-lm affine checkpoint).

The source's codes become the store's top level exactly: level k keeps the top
``level_bits(k)`` bits of every code (the same slicing the ``nested`` fit uses), the
scale of a slice is the source scale times a power of two, and the biases of the
components add up to the source bias (each lower level gets the usual mid-cell
correction, split into float16 values whose float32 sum is exactly the source bias;
where no such split exists the group's correction is dropped, so the top level stays
exact). Scales and biases are stored as float16 (docs/FORMAT.md): a source value
float16 cannot hold is the one inexactness, counted and reported.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from d2moe_mlx import mwq
from d2moe_mlx.moe import projection_names
from d2moe_mlx.packing import unpack_codes

from .calibrate import get_module
from .formats import SourceFormat, check_mlx_shapes
from .source import SourceError


def spec_for(bits: int, group_size: int) -> mwq.MWQSpec:
    """The default levels for a ``bits``-bit source: a 2-bit base and affine planes up to
    ``bits`` (8 -> 2,4,8; 6 -> 2,4,6; 5 -> 2,5; 4 -> 2,4; 3 and 2 -> one level)."""
    planes = {8: (2, 4), 6: (2, 2), 5: (3,), 4: (2,)}.get(bits)
    if planes is None:
        return mwq.MWQSpec(bits, (), group_size)
    return mwq.MWQSpec(2, planes, group_size)


def check_spec(spec: mwq.MWQSpec, bits: int, group_size: int, where: str) -> None:
    """The store's top level must be the source's width and group size."""
    top = spec.level_bits(spec.num_levels - 1)
    if top != bits or spec.group_size != group_size:
        hint = spec_for(bits, group_size)
        levels = ",".join(str(hint.level_bits(k)) for k in range(hint.num_levels))
        raise SourceError(
            f"{where} is {bits}-bit with group size {group_size}, the requested levels top out at "
            f"{top} bits with group size {spec.group_size}: the store's top level reproduces the "
            f"source's codes, so it must match; pass --levels {levels} --group-size {group_size} "
            "(or leave --levels out to get these)"
        )


def expert_codes(fmt: SourceFormat, tensors: dict[str, mx.array], switch: str, names) -> dict | None:
    """{projection: (words [E, out, k] uint32, scales, biases [E, out, G] float32, bits)} of an
    mlx affine-quantized switch module, or None when its experts are not affine-quantized."""
    out = {}
    for proj in names:
        module = f"{switch}.{proj}"
        if module + ".scales" not in tensors:
            return None
        p = fmt.params(module)
        if p is None or p["mode"] != "affine":
            return None
        check_mlx_shapes(fmt, module, tensors, p)
        out[proj] = (
            np.asarray(tensors[module + ".weight"]),  # a view of the loaded codes, no copy
            np.array(tensors[module + ".scales"].astype(mx.float32)),
            np.array(tensors[module + ".biases"].astype(mx.float32)),
            p["bits"],
        )
    return out


def components(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               spec: mwq.MWQSpec) -> tuple[list[mwq.Component], int]:
    """One expert projection's MWQ components from its packed ``bits``-bit codes
    [out, in*bits/32] and float32 scales/biases [out, G]; also the number of groups whose
    scale or bias float16 cannot hold exactly (0 = the top level is the source, bit for bit)."""
    gs = spec.group_size
    out, groups = scales.shape
    n = groups * gs
    top = spec.level_bits(spec.num_levels - 1)
    if top != bits:
        raise ValueError(f"levels top out at {top} bits, the codes have {bits}")
    q = unpack_codes(words, bits, n).reshape(out, groups, gs)
    st, zt = scales.astype(np.float32), biases.astype(np.float32)
    inexact = (st.astype(np.float16).astype(np.float32) != st) | (zt.astype(np.float16).astype(np.float32) != zt)
    inexact |= st == 0  # the runtime drops a zero-scale component's bias too
    st = st.astype(np.float16).astype(np.float32)
    zt = zt.astype(np.float16).astype(np.float32)

    rems = [top - spec.level_bits(j) for j in range(spec.num_levels)]
    comp_bits = [spec.component_bits(j) for j in range(spec.num_levels)]
    if 1 in comp_bits:
        raise ValueError("binary planes cannot slice affine codes: use affine planes (--planes affine)")
    # Mid-cell bias corrections, as the nested fit: they telescope to zero at the top.
    want = [zt + st * (2.0**rems[0] - 1) / 2]
    want += [st * (2.0**rems[j] - 2.0**rems[j - 1]) / 2 for j in range(1, len(rems))]
    zs = _exact_split(zt, want)
    comps = []
    for j, (b, rem) in enumerate(zip(comp_bits, rems)):
        c = (q >> rem) & (2**b - 1)
        s = (st * np.float32(2.0**rem)).astype(np.float16).astype(np.float32)
        comps.append(mwq.Component(b, c.reshape(out, n).astype(np.uint8), s, zs[j]))
    return comps, int(inexact.sum())


def _exact_split(total: np.ndarray, want: list[np.ndarray]) -> list[np.ndarray]:
    """float16-representable parts near ``want`` whose float32 sum (in order) is ``total``:
    all but the last rounded, the last takes the rest; groups where the rest is not a
    float16 value get (total, 0, ..., 0)."""
    parts = [np.asarray(w, np.float32).astype(np.float16).astype(np.float32) for w in want[:-1]]
    acc = np.zeros_like(total)
    for p in parts:
        acc = acc + p
    last = (total - acc).astype(np.float32)
    parts.append(last.astype(np.float16).astype(np.float32))
    acc = acc + parts[-1]
    ok = (acc == total) & (parts[-1] == last)
    if len(parts) == 1:
        return parts
    return [np.where(ok, p, total if i == 0 else np.float32(0)) for i, p in enumerate(parts)]


def expert_blocks(codes: dict, e: int, spec: mwq.MWQSpec, where: str) -> tuple[list[dict], int]:
    """Expert ``e``'s packed store blocks (one per component) from :func:`expert_codes`."""
    blocks = [dict() for _ in range(spec.num_levels)]
    inexact = 0
    for proj, (words, scales, biases, bits) in codes.items():
        if scales.shape[-1] * spec.group_size != words.shape[-1] * 32 // bits:
            raise SourceError(f"{where}.{proj}: source group size differs from the store's {spec.group_size}")
        comps, bad = components(words[e], scales[e], biases[e], bits, spec)
        inexact += bad
        for c, comp in enumerate(comps):
            for name, value in mwq.pack_component(comp).items():
                blocks[c][f"{proj}.{name}"] = value
    return blocks, inexact


def source_spec(model, fmt: SourceFormat, switches: dict[int, str], spec, weights) -> mwq.MWQSpec | None:
    """The levels for an mlx-quantized source: its experts' (bits, group size) must be one
    for all layers and the top level's; ``spec`` None derives the levels from them."""
    found = set()
    for path in switches.values():
        for name in projection_names(get_module(model, path)):
            module = f"{path}.{name}"
            p = fmt.params(module)
            if module + ".scales" in weights and p and p["mode"] == "affine":
                found.add((p["bits"], p["group_size"]))
    if not found:
        return spec  # experts not affine-quantized: dequantised and fitted like float weights
    if len(found) > 1:
        raise SourceError(f"expert projections are quantized with different (bits, group size) "
                          f"{sorted(found)}; one per model is supported")
    bits, group_size = found.pop()
    if spec is None:
        return spec_for(bits, group_size)
    check_spec(spec, bits, group_size, "the source's experts")
    return spec
