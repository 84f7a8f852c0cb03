"""Measure MWQ layer-output error against stored bits per weight.

Relative output error ||W X^T - Ŵ X^T|| / ||W X^T|| on held-out activations X
(the fit only sees H = X_cal^T X_cal / n from separate calibration tokens), for
  1. D²MoE binary planes, 2. affine residual planes, 3. MSB slices of one 8-bit
  code (midpoint bias), 4. plain single-level quantization (mx.quantize RTN and
  the fitted variants).
Stored bits count codes plus float16 scales (and biases) per group.

  python scripts/quant_table.py --part a        # synthetic heavy-tailed 768x2048
  python scripts/quant_table.py --part b        # the trained tiny MoE's experts
  python scripts/quant_table.py --part time     # quantize time per 768x2048 matrix
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core, as on a laptop converter

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from d2moe_mlx.mwq import MWQSpec, quantize_mwq, reconstruct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "d2moe_mlx" / "assets" / "tiny-moe"
CALIB = ROOT / "d2moe_mlx" / "assets" / "calib.txt"
GS = 64

BINARY = ["2,3,4", "3,4,5", "4,5,6", "5,6,7,8"]
AFFINE = ["2,4", "2,4,8", "3,6", "4,6,8", "4,8"]
SINGLE = [2, 3, 4, 5, 6, 8]
# fit name -> (method, use hessian)
FITS = {
    "rtn": ("rtn", False),  # min/max grid per component, no fit
    "ls-w": ("ls", False),  # default method, weight error only
    "ls-h": ("ls", True),  # default method, output error (the default use)
    "greedy-h": ("greedy", True),
    "nested-h": ("nested", True),
    "gptq-h": ("gptq", True),
}


class Problem:
    """A set of matrices with calibration hessians and held-out evaluation hessians."""

    def __init__(self, mats):  # list of (w, h_cal, h_eval)
        self.mats = mats
        self.den = sum(_quad(w, he) for w, _, he in mats)

    def error(self, recon_fn) -> float:
        num = sum(_quad(w - recon_fn(i, w, hc), he) for i, (w, hc, he) in enumerate(self.mats))
        return float(np.sqrt(num / self.den))


def _quad(e, h):
    e = e.astype(np.float32)
    return float(np.einsum("ij,ij->", e @ h, e, dtype=np.float64))


def synthetic(out=768, n=2048, tokens=4096, seed=0) -> Problem:
    """Student-t (df 4) weights, correlated activations with outlier channels."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, (out, n)) * 0.02).astype(np.float32)
    w[:, rng.choice(n, 8, replace=False)] *= 4  # a few outlier input channels
    mix = rng.standard_normal((32, n)).astype(np.float32) / np.sqrt(32)
    scale = np.exp(0.5 * rng.standard_normal(n)).astype(np.float32)
    scale[rng.choice(n, 8, replace=False)] *= 10  # outlier activation channels

    def acts():
        z = rng.standard_normal((tokens, n), dtype=np.float32) * 0.5
        return (z + rng.standard_normal((tokens, 32), dtype=np.float32) @ mix) * scale

    hs = [(x.T @ x / tokens) for x in (acts(), acts())]
    return Problem([(w, hs[0], hs[1])])


def tiny_moe(max_experts=8, chunk=512) -> Problem:
    """Expert matrices of the trained tiny MoE with real hidden states (mlx-lm):
    even chunks of calib.txt calibrate, odd chunks evaluate."""
    import mlx_lm

    model, tok = mlx_lm.load(str(TINY))
    model.set_dtype(mx.float32)  # CPU gather_mm is float32-only
    ids = tok.encode(CALIB.read_text())
    taps, glus = {}, {}
    for li, layer in enumerate(model.layers):
        glus[li] = inner = layer.mlp.switch_mlp

        def tap(x, idx, _inner=inner, _li=li):
            taps.setdefault(_li, []).append((x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1])))
            return _inner(x, idx)

        layer.mlp.switch_mlp = tap
    for s in range(0, len(ids) - chunk + 1, chunk):
        mx.eval(model(mx.array(ids[s : s + chunk])[None]), taps)
    mats = []
    for li, lst in taps.items():
        x_all = [np.array(x.astype(mx.float32)) for x, _ in lst]
        i_all = [np.array(i) for _, i in lst]
        glu = glus[li]
        for e in range(min(max_experts, glu.gate_proj.weight.shape[0])):
            xs = [np.concatenate([x[(i == e).any(-1)] for x, i in zip(x_all[h::2], i_all[h::2])])
                  for h in (0, 1)]
            if min(len(x) for x in xs) < 8:
                continue
            wts = {k: np.array(getattr(glu, f"{k}_proj").weight[e].astype(mx.float32))
                   for k in ("gate", "up", "down")}
            hid = [_silu(x @ wts["gate"].T) * (x @ wts["up"].T) for x in xs]
            for name, ins in (("gate", xs), ("up", xs), ("down", hid)):
                hc, he = (a.T @ a / len(a) for a in ins)
                mats.append((wts[name], hc.astype(np.float32), he.astype(np.float32)))
    return Problem(mats)


def _silu(x):
    return x / (1 + np.exp(-x))


def mwq_rows(prob: Problem, levels: str, planes: str, gs: int = GS, fits=None):
    spec = MWQSpec.parse(levels, gs, planes)
    rows = []
    for fit in fits or FITS:
        method, use_h = FITS[fit]
        cache = {i: quantize_mwq(w, spec, hc if use_h else None, method=method)
                 for i, (w, hc, _) in enumerate(prob.mats)}
        cells = [(spec.stored_bits(k), prob.error(lambda i, w, hc, k=k: reconstruct(cache[i], gs, k)))
                 for k in range(spec.num_levels)]
        name = levels.replace(",", "→") + ("" if gs == GS else f" (g{gs})")
        rows.append((name, fit, cells))
    return rows


def msb_rows(prob: Problem):
    """Top-b bits of one 8-bit code, value s*2^(8-b)*a + z + s*(2^(8-b)-1)/2."""
    rows = []
    for fit, (method, use_h) in (("rtn", FITS["rtn"]), ("ls-h", FITS["ls-h"])):
        comps = {i: quantize_mwq(w, MWQSpec(8, (), GS), hc if use_h else None, method=method)[0]
                 for i, (w, hc, _) in enumerate(prob.mats)}
        cells = []
        for b in (2, 3, 4, 5, 6, 8):
            def rec(i, w, hc, b=b):
                c = comps[i]
                sh = 8 - b
                a = (c.codes >> sh).astype(np.float32)
                s = np.repeat(c.scales, GS, 1)
                z = np.repeat(_f16(c.biases + c.scales * (2**sh - 1) / 2), GS, 1)
                return s * 2**sh * a + z
            cells.append((b + 32 / GS, prob.error(rec)))
        rows.append(("8-bit code, top b", fit, cells))
    return rows


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def plain_rows(prob: Problem):
    rows = []
    cells = []
    for b in SINGLE:
        def rec(i, w, hc, b=b):
            q = mx.quantize(mx.array(w), group_size=GS, bits=b)
            return np.array(mx.dequantize(*q, group_size=GS, bits=b))
        cells.append((b + 32 / GS, prob.error(rec)))
    rows.append(("mx.quantize", "rtn", cells))
    for fit in ("ls-w", "ls-h", "gptq-h"):  # one level: ls = greedy = nested
        method, use_h = FITS[fit]
        cells = []
        for b in SINGLE:
            def rec(i, w, hc, b=b):
                return reconstruct(quantize_mwq(w, MWQSpec(b, (), GS), hc if use_h else None, method=method), GS, 0)
            cells.append((b + 32 / GS, prob.error(rec)))
        rows.append(("single level", fit, cells))
    return rows


def print_table(title, rows):
    width = max(len(c) for _, _, c in rows)
    print(f"\n**{title}**\n")
    print("| scheme | fit | " + " | ".join(f"level {k}" for k in range(width)) + " |")
    print("|---|---|" + "---|" * width)
    for name, fit, cells in rows:
        txt = [f"{b:.2f} b: {e:.4f}" for b, e in cells] + [""] * (width - len(cells))
        print(f"| {name} | {fit} | " + " | ".join(txt) + " |", flush=True)


def run_tables(prob: Problem):
    print_table("(1) D²MoE binary planes", [r for lv in BINARY for r in mwq_rows(prob, lv, "binary")])
    print_table("(2) affine residual planes", [r for lv in AFFINE for r in mwq_rows(prob, lv, "affine")])
    print_table("(3) MSB slices of one 8-bit code (levels b = 2,3,4,5,6,8)", msb_rows(prob))
    print_table("(4) single level (b = 2,3,4,5,6,8)", plain_rows(prob))
    print_table("(5) group size, ls-h", [r for lv, pl in (("2,3,4", "binary"), ("2,4,8", "affine"))
                                         for g in (32, 64, 128) for r in mwq_rows(prob, lv, pl, g, ["ls-h"])])


def timings():
    prob = synthetic()
    w, hc, _ = prob.mats[0]
    print("\n| spec | fit | seconds per 768x2048 matrix |\n|---|---|---|")
    for levels, planes in (("2,3,4", "binary"), ("2,4,8", "affine"), ("5,6,7,8", "binary"), ("4", "binary")):
        spec = MWQSpec.parse(levels, GS, planes)
        for fit, (method, use_h) in FITS.items():
            reps = 1 if method == "gptq" else 3
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                quantize_mwq(w, spec, hc if use_h else None, method=method)
                ts.append(time.perf_counter() - t)
            print(f"| {levels.replace(',', '→')} | {fit} | {min(ts):.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("a", "b", "time", "all"), default="all")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer in part b")
    args = ap.parse_args()
    if args.part in ("a", "all"):
        print("\n### (a) synthetic: student-t(4) weights 768x2048, correlated activations, outliers")
        run_tables(synthetic())
    if args.part in ("b", "all"):
        if not (TINY / "model.safetensors").exists():
            print(f"\n### (b) skipped: {TINY / 'model.safetensors'} not found")
        else:
            prob = tiny_moe(args.experts)
            print(f"\n### (b) tiny MoE: {len(prob.mats)} expert matrices, real hidden states")
            run_tables(prob)
    if args.part in ("time", "all"):
        timings()


if __name__ == "__main__":
    main()
