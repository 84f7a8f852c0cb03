"""MWQ (Matryoshka Weight Quantization): nested-bit expert weights.

A weight W [out, in] becomes a low-bit affine base plus residual planes, each
with its own per-group scale (and bias for affine planes).  Level k is
``base + planes[0..k-1]``; every component is an MLX-native quantized matrix,
so each level runs as one ``gather_qmm`` call per component.

Fitting (D²MoE): with a hessian H = X^T X / n, scales/biases minimise the
layer-output error ||(W - Ŵ) X^T||² restricted to each group's diagonal block of
H; without one, the weight error.  The default ``method="nested"`` fits one grid
at the top level and slices it into components, so every level is one k-bit
tensor (the runtime packs them: one pass per level, d2moe_mlx/layout.py);
``"ls"`` picks per group between that and a greedy fit (each component fitted to
the residual of the levels below), by the product of all level errors (about 2%
lower error at levels 0-1, but levels then cost one pass per component);
``"gptq"`` adds GPTQ error compensation (10x slower).  Scales
and biases are rounded to float16 while fitting, so each plane fits the residual
of exactly what the runtime reconstructs.

Pure maths, no file I/O.  Packing lives in :mod:`d2moe_mlx.packing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .packing import component_to_mlx, pack_component, unpack_component  # noqa: F401

MLX_BITS = (2, 3, 4, 5, 6, 8)  # affine widths mx.quantize / gather_qmm support
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "greedy", "nested", "ls", "gptq")
DEFAULT_METHOD = "nested"  # levels pack into one tensor each (layout.py); docs/QUANTIZATION.md
_DAMP = 0.01  # hessian dampening, fraction of the mean diagonal (as GPTQ)
_SHRINK = (1.0, 0.85, 0.7)  # range-clipping candidates for the affine init
_ITERS = 2  # alternating code / (scale, bias) refits


@dataclass(frozen=True)
class MWQSpec:
    """Nested-bit layout: an affine base plus residual planes."""

    base_bits: int
    plane_bits: tuple[int, ...]
    group_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "plane_bits", tuple(int(b) for b in self.plane_bits))
        if self.base_bits not in MLX_BITS:
            raise ValueError(
                f"a base of {self.base_bits} bits is unsupported: the base (the lowest level) "
                f"has one of {MLX_BITS} bits, the widths MLX's quantized kernels accept"
            )
        for i, b in enumerate(self.plane_bits):
            if b != 1 and b not in MLX_BITS:
                raise ValueError(
                    f"a plane of {b} bits (plane {i + 1}) is unsupported: a plane adds 1 bit "
                    f"(binary ±1 plane) or an affine width in {MLX_BITS}"
                )
        if self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group size {self.group_size} unsupported: use one of {GROUP_SIZES}"
            )

    @property
    def num_levels(self) -> int:
        return 1 + len(self.plane_bits)

    def component_bits(self, component: int) -> int:
        """Bits of stored component ``component`` (0 = base, then each plane)."""
        if not 0 <= component < self.num_levels:
            raise ValueError(f"component {component} out of range [0, {self.num_levels})")
        return self.base_bits if component == 0 else self.plane_bits[component - 1]

    def level_bits(self, level: int) -> int:
        """Nominal code bits of ``level`` (0 = base only)."""
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level {level} out of range [0, {self.num_levels})")
        return self.base_bits + sum(self.plane_bits[:level])

    def stored_bits(self, level: int) -> float:
        """Bits per weight on disk up to ``level``, fp16 scales/biases included."""
        bits = self.base_bits + 32 / self.group_size
        for b in self.plane_bits[:level]:
            bits += b + (16 if b == 1 else 32) / self.group_size
        return bits

    def to_dict(self) -> dict:
        return {
            "base_bits": self.base_bits,
            "plane_bits": list(self.plane_bits),
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MWQSpec":
        try:
            return cls(int(d["base_bits"]), tuple(d["plane_bits"]), int(d.get("group_size", 64)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad MWQSpec dict {d!r}: {e}") from None

    @classmethod
    def parse(cls, levels: str, group_size: int = 64, planes: str = "binary") -> "MWQSpec":
        """``"2,3,4"`` -> base 2 + binary planes (1, 1); with ``planes="affine"``
        ``"2,4,8"`` -> base 2 + affine planes (2, 4)."""
        try:
            lv = [int(t) for t in str(levels).replace("->", ",").split(",") if t.strip()]
        except ValueError:
            raise ValueError(
                f"levels={levels!r} (--levels {levels}) is not a list of bit-widths: give "
                "increasing total bit-widths like '2,3,4'"
            ) from None
        if not lv:
            raise ValueError("no levels given: give total bit-widths like '2,3,4'")
        steps = [b - a for a, b in zip(lv, lv[1:])]
        if any(s <= 0 for s in steps):
            raise ValueError(f"levels={levels!r} (--levels {levels}) must strictly increase")
        if planes == "binary":
            if any(s != 1 for s in steps):
                raise ValueError(
                    f"levels={levels!r} (--levels {levels}): binary planes add exactly 1 bit per "
                    "level; use planes='affine' (--planes affine) for larger steps"
                )
        elif planes != "affine":
            raise ValueError(f"planes={planes!r} (--planes {planes}): use 'binary' or 'affine'")
        return cls(lv[0], tuple(steps), group_size)


# 2 -> 4 -> 8 bits with affine planes: measured best error per stored bit among
# the nested layouts that MLX runs natively (docs/QUANTIZATION.md): level 1 costs
# ~0.5 b over a single-level 4-bit fit, level 2 matches 8-bit, and in memory a
# level costs what it stores (binary planes must be expanded to 2-bit for MLX).
DEFAULT_SPEC = MWQSpec(2, (2, 4), 64)


@dataclass
class Component:
    """One quantized matrix: binary (bits=1, value = s*(2c-1)) or affine (s*c + b)."""

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray | None


# ---------------------------------------------------------------- helpers


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to the nearest float16 value (clipped to its range), as float32."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


def hessian_blocks(x: np.ndarray, group_size: int) -> np.ndarray:
    """The diagonal blocks [G, gs, gs] of X^T X / n for inputs ``x`` [n, in] (float64).

    All the fits but GPTQ read only these blocks, and they cost n·in·gs
    instead of n·in² to build; ``quantize_mwq`` accepts them as ``hessian``.
    """
    n, in_dim = x.shape
    xg = x.astype(np.float64).reshape(n, in_dim // group_size, group_size)
    return np.einsum("ngi,ngj->gij", xg, xg) / max(n, 1)


def _blocks(h: np.ndarray | None, in_dim: int, gs: int) -> np.ndarray | None:
    """Dampened diagonal blocks [G, gs, gs] of the hessian (None = identity).

    ``h`` is the full [in, in] hessian or already its diagonal blocks [G, gs, gs].
    """
    if h is None:
        return None
    h = np.asarray(h)
    g = in_dim // gs
    if h.shape not in ((in_dim, in_dim), (g, gs, gs)):
        raise ValueError(
            f"hessian shape {h.shape} does not match in={in_dim}: give [in, in] or its "
            f"diagonal blocks [{g}, {gs}, {gs}]"
        )
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian contains NaN or inf")
    if h.ndim == 3:
        diag = np.diagonal(h, axis1=1, axis2=2)
        hb = h.astype(np.float32)
    else:
        diag = np.diag(h)
        idx = np.arange(g)
        hb = h.reshape(g, gs, g, gs)[idx, :, idx, :].astype(np.float32)
    mean = float(np.clip(diag, 0.0, None).astype(np.float64).mean())
    if not mean > 0:  # no calibration data: plain weight error
        return None
    hb = 0.5 * (hb + hb.transpose(0, 2, 1))
    # Dead channels get the damping floor: their weights still count a little.
    hb += np.eye(gs, dtype=np.float32) * np.float32(_DAMP * mean)
    return hb


def _hmul(e: np.ndarray, hb: np.ndarray | None) -> np.ndarray:
    """e [out, G, gs] times each group's block of H."""
    if hb is None:
        return e
    return np.matmul(e.transpose(1, 0, 2), hb).transpose(1, 0, 2)


def _err(e: np.ndarray, hb: np.ndarray | None) -> np.ndarray:
    """Per-group weighted squared error e^T H_gg e, [out, G]."""
    return np.einsum("rga,rga->rg", e, _hmul(e, hb))


def _codes(w: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)  # s = 0: code 0
    q = w - z[..., None]
    q *= inv[..., None]
    np.rint(q, out=q)
    return np.clip(q, 0, 2**bits - 1, out=q)


def _affine_fit(w: np.ndarray, hb: np.ndarray | None, bits: int, method: str):
    """Per-group affine quantizer of w [out, G, gs] -> (codes, s, z) (float32)."""
    qmax = 2**bits - 1
    lo, hi = w.min(-1), w.max(-1)
    h1 = np.ones(w.shape[1:], np.float32) if hb is None else hb.sum(-1)  # H·1 [G, gs]
    hw = _hmul(w, hb)
    best = None
    for shrink in _SHRINK if method != "rtn" else (1.0,):  # "greedy"/"ls": search
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * shrink
        s = _f16((2 * half) / qmax)
        z = _f16(mid - half)
        q = _codes(w, s, z, bits)
        best = _keep_best(best, (q, s, z, _hmul(q, hb)), w, hw, h1)
    if method == "rtn":
        return best[:3]
    c = h1.sum(-1)[None, :]  # 1'H1 [1, G]
    rz = hw.sum(-1)  # 1'Hw [out, G]
    for _ in range(_ITERS):
        q, hq = best[0], best[3]
        a = np.einsum("rga,rga->rg", q, hq)
        b = np.einsum("rga,ga->rg", q, h1)
        rs = np.einsum("rga,rga->rg", q, hw)
        det = a * c - b * b
        ok = det > 1e-9 * np.maximum(a * c, 1e-30)
        dsafe = np.where(ok, det, 1.0)
        s = np.where(ok, (c * rs - b * rz) / dsafe, best[1])
        z = np.where(ok, (a * rz - b * rs) / dsafe, (rz - best[1] * b) / c)
        s, z = _f16(s), _f16(z)
        best = _keep_best(best, (q, s, z, hq), w, hw, h1)  # refit on the same codes
        q = _codes(w, s, z, bits)
        best = _keep_best(best, (q, s, z, _hmul(q, hb)), w, hw, h1)
    return best[:3]


def _keep_best(best, cand, w, hw, h1):
    """Per group, keep whichever of best/cand (codes, s, z, H·codes) has the
    smaller weighted error e'He, with He = Hw - s·Hq - z·H1 (no extra matmul)."""
    q, s, z, hq = cand
    e = q * s[..., None]
    e += z[..., None]
    np.subtract(w, e, out=e)
    he = hq * s[..., None]
    he += z[..., None] * h1
    np.subtract(hw, he, out=he)
    err = np.einsum("rga,rga->rg", e, he)
    if best is None:
        return [q.copy(), s.copy(), z.copy(), hq.copy(), err]
    take = err < best[4]
    t3 = np.broadcast_to(take[..., None], q.shape)
    for dst, src, m in zip(best, (q, s, z, hq, err), (t3, take, take, t3, take)):
        np.copyto(dst, src, where=m)
    return best


def _binary_fit(r: np.ndarray, hb: np.ndarray | None):
    """Binary plane of residual r [out, G, gs]: sign codes, fitted scale."""
    q = np.where(r >= 0, 1.0, -1.0).astype(np.float32)
    hq = _hmul(q, hb)
    num = np.einsum("rga,rga->rg", r, hq)
    den = np.einsum("rga,rga->rg", q, hq)
    s = _f16(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))
    return q, s


def _gptq_hinv(h: np.ndarray) -> np.ndarray | None:
    """Upper Cholesky factor of the dampened inverse hessian (GPTQ)."""
    h = np.asarray(h, np.float64)
    h = 0.5 * (h + h.T)
    d = np.diag(h).copy()
    dead = d <= 0
    h[dead, dead] = 1.0
    h += np.eye(len(h)) * (_DAMP * max(d.mean(), 1e-12))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return None


def _gptq(w: np.ndarray, hinv: np.ndarray, hb: np.ndarray, bits: int, gs: int):
    """GPTQ (lazy-batched) of w [out, in] -> (codes, s, z) [out, G, gs], [out, G].
    Each group's scale/bias is the "ls" fit of the compensated weights at the
    group's start; bits=1 is a binary plane (codes ±1, z = 0)."""
    out, n = w.shape
    w = w.astype(np.float64).copy()
    q = np.zeros((out, n), np.float32)
    s_all = np.zeros((out, n // gs), np.float32)
    z_all = np.zeros((out, n // gs), np.float32)
    blk = 128  # a multiple of every group size: groups never straddle blocks
    for b0 in range(0, n, blk):
        b1 = min(b0 + blk, n)
        wb = w[:, b0:b1].copy()
        eb = np.zeros_like(wb)
        u = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            gi = col // gs
            if col % gs == 0:
                seg = wb[:, None, j : j + gs].astype(np.float32)
                if bits == 1:
                    _, sg = _binary_fit(seg, hb[gi : gi + 1])
                    zg = np.zeros_like(sg)
                else:
                    _, sg, zg = _affine_fit(seg, hb[gi : gi + 1], bits, "ls")
                s_all[:, gi], z_all[:, gi] = sg[:, 0], zg[:, 0]
            s, z = s_all[:, gi], z_all[:, gi]
            if bits == 1:
                qc = np.where(wb[:, j] >= 0, 1.0, -1.0)
            else:
                qc = _codes(wb[:, j : j + 1].astype(np.float32), s, z, bits)[:, 0]
            q[:, col] = qc
            err = (wb[:, j] - (s * qc + z)) / u[j, j]
            wb[:, j:] -= np.outer(err, u[j, j:])
            eb[:, j] = err
        w[:, b1:] -= eb @ hinv[b0:b1, b1:]
    return q.reshape(out, n // gs, gs), s_all, z_all


# ---------------------------------------------------------------- public API


def _check(w: np.ndarray, spec: MWQSpec) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {w.shape}")
    if w.shape[1] % spec.group_size:
        raise ValueError(
            f"in={w.shape[1]} is not divisible by group_size={spec.group_size}"
        )
    if w.size == 0:
        raise ValueError("weight is empty")
    w = w.astype(np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or inf")
    if np.abs(w).max() > 6e4:
        raise ValueError("weight magnitude exceeds the float16 scale range (6e4)")
    return w


def quantize_mwq(
    w: np.ndarray,
    spec: MWQSpec,
    hessian: np.ndarray | None = None,
    *,
    method: str = DEFAULT_METHOD,
) -> list[Component]:
    """Quantize ``w`` [out, in] into ``spec.num_levels`` components.

    method: "rtn" (min/max grid, no fit); "greedy" (each component in turn gets
    the least-squares (scale, bias) fit with range search on the residual);
    "nested" (one fitted grid at the top level, sliced: each level is the top-b
    bits of that code, binary planes are sign(R) with half the cell width; the
    default); "ls" (per group, whichever of greedy / nested has the smaller
    product of level errors); "gptq" (every component GPTQ-compensated; needs a
    hessian, ~10x slower).  Errors are output errors with a hessian.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    w = _check(w, spec)
    out, n = w.shape
    gs = spec.group_size
    hb = _blocks(hessian, n, gs) if method != "rtn" else None
    if method != "rtn" and hessian is not None and hb is None:
        hessian = None  # all-zero hessian: weight error only
    wg = w.reshape(out, n // gs, gs)

    if method == "ls" and spec.plane_bits:  # per group, greedy or nested, by all levels
        ga, ea = _fit_levels(wg, spec, hb, None, "greedy")
        gb, eb = _fit_levels(wg, spec, hb, None, "nested")
        take = (np.log(eb + 1e-30) - np.log(ea + 1e-30)).sum(0) < 0  # [out, G]
        fits = [tuple(np.where(take[..., None] if x.ndim == 3 else take, y, x)
                      for x, y in zip(fa, fb)) for fa, fb in zip(ga, gb)]
    else:
        if method == "gptq" and hb is not None and np.ndim(hessian) != 2:
            raise ValueError("method='gptq' needs the full [in, in] hessian, not its diagonal blocks")
        hinv = _gptq_hinv(hessian) if method == "gptq" and hb is not None else None
        fits, _ = _fit_levels(wg, spec, hb, hinv, method)
    comps = []
    for bits, (q, s, z) in zip((spec.base_bits, *spec.plane_bits), fits):
        if bits == 1:
            comps.append(_component(1, (q + 1) / 2, s, None, out, n))
        else:
            comps.append(_component(bits, q, s, z, out, n))
    return comps


def _fit_levels(wg, spec: MWQSpec, hb, hinv, method: str):
    """All components as (codes, s, z) [out, G, gs] / [out, G] (binary codes ±1),
    and each level's weighted error [levels, out, G]."""
    out, g, gs = wg.shape
    nested = method == "nested"
    if nested:  # one fitted grid at the top level, sliced into components
        top = spec.level_bits(spec.num_levels - 1)
        _, st, zt = _affine_fit(wg, hb, top, "ls")
    fits, errs, recon, rem = [], [], np.zeros_like(wg), None
    for j, bits in enumerate((spec.base_bits, *spec.plane_bits)):
        r = wg - recon
        if nested:
            prev, rem = rem, top - spec.level_bits(j)
            s = _f16(st * 2.0**rem)
            if j == 0:
                z = _f16(zt + st * (2.0**rem - 1) / 2)
            else:
                z = _f16(st * (2.0**rem - 2.0**prev) / 2)
            if bits == 1:
                q, s, z = np.where(r >= 0, 1.0, -1.0), _f16(st * 2.0 ** (rem - 1)), 0 * s
            else:
                q = _codes(r, s, z, bits)
        elif hinv is not None:
            q, s, z = _gptq(r.reshape(out, g * gs), hinv, hb, bits, gs)
        elif bits == 1:
            q, s = _binary_fit(r, hb)
            z = np.zeros_like(s)
        else:
            q, s, z = _affine_fit(r, hb, bits, method)
        e = _err(r - (s[..., None] * q + z[..., None]), hb)
        if fits and hinv is None:  # a plane must never make its group worse
            e0 = _err(r, hb)
            worse = e > e0
            s, z, e = np.where(worse, 0.0, s), np.where(worse, 0.0, z), np.where(worse, e0, e)
            if bits != 1:
                q = np.where(worse[..., None], 0.0, q)
        recon = recon + (s[..., None] * q + z[..., None])
        fits.append((q, s, z))
        errs.append(e)
    return fits, np.stack(errs)


def _component(bits, q, s, z, out, n) -> Component:
    return Component(
        bits=bits,
        codes=q.reshape(out, n).astype(np.uint8),
        scales=np.ascontiguousarray(s, np.float32),
        biases=None if z is None else np.ascontiguousarray(z, np.float32),
    )


def blend_hessian(
    h: np.ndarray | None, n: int, prior: np.ndarray, prior_tokens: int = 256
) -> np.ndarray:
    """(n·H + k·prior) / (n + k): for rarely routed experts, lean on a prior such as
    the layer's pooled hessian (H of a few tokens over-fits the scales; see
    docs/QUANTIZATION.md).  ``h`` may be None when n == 0."""
    if n < 0 or prior_tokens < 0 or n + prior_tokens == 0:
        raise ValueError("need n >= 0, prior_tokens >= 0 and n + prior_tokens > 0")
    prior = np.asarray(prior, np.float64)
    if n == 0 or h is None:
        return prior.astype(np.float32)
    return ((n * np.asarray(h, np.float64) + prior_tokens * prior) / (n + prior_tokens)).astype(np.float32)


def dequantize(c: Component, group_size: int) -> np.ndarray:
    """float32 [out, in] values of one component (what MLX computes)."""
    out, n = c.codes.shape
    q = c.codes.reshape(out, n // group_size, group_size).astype(np.float32)
    s = c.scales.astype(np.float32)[..., None]
    if c.bits == 1:
        v = s * (2 * q - 1)
    else:
        v = s * q + c.biases.astype(np.float32)[..., None]
    return v.reshape(out, n)


def reconstruct(components: list[Component], group_size: int, level: int) -> np.ndarray:
    """Ŵ at ``level``: the sum of components[0..level] in float32."""
    if not 0 <= level < len(components):
        raise ValueError(f"level {level} out of range [0, {len(components)})")
    acc = dequantize(components[0], group_size)
    for c in components[1 : level + 1]:
        acc = acc + dequantize(c, group_size)
    return acc
