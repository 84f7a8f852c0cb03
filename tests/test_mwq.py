"""MWQ quantizer: definitions, monotone error, packing, MLX kernels, validation.

References are plain numpy maths written independently of d2moe_mlx.mwq.
"""

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx.mwq import (
    DEFAULT_SPEC,
    Component,
    MWQSpec,
    blend_hessian,
    component_to_mlx,
    dequantize,
    pack_component,
    quantize_mwq,
    reconstruct,
    unpack_component,
)

SPECS = [
    MWQSpec(2, (1, 1), 64),
    MWQSpec(3, (1, 1, 1), 32),
    MWQSpec(2, (2, 4), 64),
    MWQSpec(4, (4,), 128),
    MWQSpec(5, (1, 3), 64),
]


def heavy_weight(out=64, n=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (out, n)) * 0.02
    w[:, rng.choice(n, 4, replace=False)] *= 10  # outlier input channels
    return w.astype(np.float32)


def correlated_hessian(n=256, seed=1, tokens=2048):
    """Correlated, anisotropic H = X^T X / n."""
    rng = np.random.default_rng(seed)
    mix = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.standard_normal((tokens, 8)) @ rng.standard_normal((8, n))  # low-rank part
    x = x + rng.standard_normal((tokens, n)) @ mix
    x *= np.exp(1.5 * rng.standard_normal(n))  # channel scales
    return (x.T @ x / tokens).astype(np.float32)


def out_err(w, w_hat, h):
    e = (w - w_hat).astype(np.float64)
    return np.sqrt(np.einsum("ij,jk,ik->", e, h, e) / np.einsum("ij,jk,ik->", w, h, w))


def ref_value(c: Component, gs: int) -> np.ndarray:
    """Independent dequantization: expand per-group scale/bias with np.repeat."""
    s = np.repeat(c.scales, gs, axis=1)
    q = c.codes.astype(np.float32)
    if c.bits == 1:
        return s * (2 * q - 1)
    return s * q + np.repeat(c.biases, gs, axis=1)


def is_f16(a):
    return np.array_equal(a.astype(np.float16).astype(np.float32), a)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("method,use_h", [("rtn", False), ("ls", False), ("ls", True), ("gptq", True)])
def test_levels_match_definition(spec, method, use_h):
    w = heavy_weight()
    h = correlated_hessian() if use_h else None
    comps = quantize_mwq(w, spec, h, method=method)
    assert len(comps) == spec.num_levels
    assert [c.bits for c in comps] == [spec.base_bits, *spec.plane_bits]
    gs = spec.group_size
    acc = None
    for level, c in enumerate(comps):
        assert c.codes.dtype == np.uint8 and c.codes.shape == w.shape
        assert c.codes.max() < 2**c.bits
        assert c.scales.shape == (w.shape[0], w.shape[1] // gs)
        assert is_f16(c.scales)
        if c.bits == 1:
            assert c.biases is None
            v = ref_value(c, gs)
            np.testing.assert_array_equal(np.abs(v), np.abs(np.repeat(c.scales, gs, 1)))
        else:
            assert c.biases.shape == c.scales.shape and is_f16(c.biases)
        v = ref_value(c, gs)
        np.testing.assert_array_equal(dequantize(c, gs), v)
        acc = v if acc is None else acc + v
        np.testing.assert_array_equal(reconstruct(comps, gs, level), acc)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_decreases_with_level(spec):
    w = heavy_weight(seed=3)
    h = correlated_hessian(seed=4)
    c_w = quantize_mwq(w, spec)  # weight-only fit
    c_h = quantize_mwq(w, spec, h)  # output-aware fit
    werr = [np.linalg.norm(w - reconstruct(c_w, spec.group_size, k)) for k in range(spec.num_levels)]
    oerr = [out_err(w, reconstruct(c_h, spec.group_size, k), h) for k in range(spec.num_levels)]
    assert all(b < a for a, b in zip(werr, werr[1:])), werr
    assert all(b < a for a, b in zip(oerr, oerr[1:])), oerr
    assert oerr[-1] < 0.25


def test_output_aware_beats_weight_only():
    w = heavy_weight(128, 256, seed=5)
    h = correlated_hessian(seed=6)
    for spec in (MWQSpec(2, (1, 1)), MWQSpec(4, ())):
        c_w = quantize_mwq(w, spec)
        c_h = quantize_mwq(w, spec, h)
        for k in range(spec.num_levels):
            e_w = out_err(w, reconstruct(c_w, spec.group_size, k), h)
            e_h = out_err(w, reconstruct(c_h, spec.group_size, k), h)
            assert e_h < 0.9 * e_w, (spec, k, e_h, e_w)


def test_robust_inputs():
    w = heavy_weight()
    w[3] = 0.0  # zero row
    w[5, :64] = 0.7  # constant group
    h = correlated_hessian()
    h[10:20, :] = 0.0  # dead input channels
    h[:, 10:20] = 0.0
    for hh in (h, np.zeros_like(h), None):
        for method in ("ls", "gptq", "rtn"):
            comps = quantize_mwq(w, MWQSpec(2, (1, 2)), hh, method=method)
            r = reconstruct(comps, 64, 2)
            assert np.all(np.isfinite(r))
            np.testing.assert_array_equal(r[3], 0.0)
            np.testing.assert_allclose(r[5, :64], 0.7, rtol=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_roundtrip_and_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    out, n, gs = 16, 256, 64
    codes = rng.integers(0, 2**bits, (out, n), dtype=np.uint8)
    scales = rng.standard_normal((out, n // gs)).astype(np.float16).astype(np.float32)
    biases = None if bits == 1 else rng.standard_normal(scales.shape).astype(np.float16).astype(np.float32)
    c = Component(bits, codes, scales, biases)
    p = pack_component(c)
    assert p["weight"].dtype == np.uint32 and p["weight"].shape == (out, n * bits // 32)
    assert p["scales"].dtype == np.float16
    assert ("biases" in p) == (bits != 1)
    u = unpack_component(p, bits, (out, n))
    assert u.bits == bits
    np.testing.assert_array_equal(u.codes, codes)
    np.testing.assert_array_equal(u.scales, scales)
    if bits == 1:
        assert u.biases is None
        # 1 bit/weight, uint32 words along the input dim, LSB first
        bit = (p["weight"][:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
        np.testing.assert_array_equal(bit.reshape(out, n), codes)
    else:
        np.testing.assert_array_equal(u.biases, biases)
        ref = mx.dequantize(
            mx.array(p["weight"]), mx.array(scales), mx.array(biases), group_size=gs, bits=bits
        )
        np.testing.assert_array_equal(np.array(ref), dequantize(c, gs))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_component_to_mlx_matmul(bits):
    rng = np.random.default_rng(10 + bits)
    E, out, n, gs = 3, 32, 128, 32
    spec = MWQSpec(2 if bits == 1 else bits, (1,) if bits == 1 else (), gs)
    comps = [quantize_mwq(heavy_weight(out, n, seed=e), spec)[-1] for e in range(E)]
    dense = np.stack([dequantize(c, gs) for c in comps])
    packed = [pack_component(c) for c in comps]
    stacked = {k: np.stack([p[k] for p in packed]) for k in packed[0]}
    w, s, b, mbits = component_to_mlx(stacked, bits)
    assert mbits == (2 if bits == 1 else bits)
    assert w.shape[:2] == (E, out) and s.shape == (E, out, n // gs) == b.shape
    x = rng.standard_normal((5, n)).astype(np.float32)
    # one expert through quantized_matmul
    w0, s0, b0, _ = component_to_mlx(packed[1], bits)
    y = mx.quantized_matmul(mx.array(x), w0, s0, b0, transpose=True, group_size=gs, bits=mbits)
    ref = x @ dense[1].T
    assert np.abs(np.array(y) - ref).max() <= 1e-5 * np.abs(ref).max()
    # all experts through gather_qmm with the stacked leading dim
    idx = np.array([[0, 2], [1, 0], [2, 2], [1, 1], [0, 1]], dtype=np.uint32)
    y = mx.gather_qmm(
        mx.array(x)[:, None, None, :], w, s, b, rhs_indices=mx.array(idx),
        transpose=True, group_size=gs, bits=mbits,
    )
    y = np.array(y)[:, :, 0, :]
    ref = np.einsum("tn,tkon->tko", x, dense[idx])
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    if bits == 1 and mx.default_device() == mx.cpu:
        # MLX's own 1-bit format, same packed words. CPU only: MLX 0.32.4's CUDA
        # backend refuses it ("1-bit quantization is not supported"), which is
        # why binary planes are expanded to 2 bits by default.
        w1, s1, b1, one = component_to_mlx(stacked, 1, native_1bit=True)
        assert one == 1 and w1.shape == (E, out, n // 32)
        y1 = mx.gather_qmm(
            mx.array(x)[:, None, None, :], w1, s1, b1, rhs_indices=mx.array(idx),
            transpose=True, group_size=gs, bits=1,
        )
        assert np.abs(np.array(y1)[:, :, 0, :] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_spec_parse_and_validation():
    assert MWQSpec.parse("2,3,4") == MWQSpec(2, (1, 1), 64)
    assert MWQSpec.parse("2,4,8", planes="affine") == MWQSpec(2, (2, 4), 64)
    assert MWQSpec.parse("5,6,7,8", group_size=128).plane_bits == (1, 1, 1)
    s = MWQSpec(2, (1, 1))
    assert s.num_levels == 3 and [s.level_bits(k) for k in range(3)] == [2, 3, 4]
    assert MWQSpec.from_dict(s.to_dict()) == s
    assert MWQSpec.from_dict(DEFAULT_SPEC.to_dict()) == DEFAULT_SPEC
    assert s.stored_bits(0) == 2.5 and s.stored_bits(2) == 2.5 + 2 * 1.25
    for bad in ("2,4,8", "4,3", "", "a,b", "2,2"):
        with pytest.raises(ValueError):
            MWQSpec.parse(bad)
    with pytest.raises(ValueError):
        MWQSpec.parse("2,3", planes="ternary")
    with pytest.raises(ValueError):
        MWQSpec.parse("2,9", planes="affine")
    for args in ((1, ()), (7, ()), (9, ()), (2, (7,)), (2, (0,)), (4, (), 16)):
        with pytest.raises(ValueError):
            MWQSpec(*args)
    with pytest.raises(ValueError):
        MWQSpec.from_dict({"plane_bits": [1]})
    with pytest.raises(ValueError):
        s.level_bits(3)


def test_bad_input():
    spec = MWQSpec(2, (1,))
    w = heavy_weight()
    for bad in (w[0], w[None], w[:, :100], np.zeros((4, 0), np.float32)):
        with pytest.raises(ValueError):
            quantize_mwq(bad, spec)
    for v in (np.nan, np.inf):
        w2 = w.copy()
        w2[1, 2] = v
        with pytest.raises(ValueError):
            quantize_mwq(w2, spec)
    h = correlated_hessian()
    h[0, 0] = np.nan
    with pytest.raises(ValueError):
        quantize_mwq(w, spec, h)
    with pytest.raises(ValueError):
        quantize_mwq(w, spec, np.eye(128, dtype=np.float32))
    with pytest.raises(ValueError):
        quantize_mwq(w, spec, method="magic")
    with pytest.raises(ValueError):
        reconstruct(quantize_mwq(w, spec), 64, 2)


def test_blend_hessian_rescues_rare_experts():
    rng = np.random.default_rng(7)
    w = heavy_weight(64, 256, seed=7)
    h_layer = correlated_hessian(seed=8)
    x = rng.standard_normal((2, 256)).astype(np.float32)  # an expert that saw 2 tokens
    h_few = x.T @ x / 2
    ref = (2 * h_few.astype(np.float64) + 6 * h_layer.astype(np.float64)) / 8
    np.testing.assert_allclose(blend_hessian(h_few, 2, h_layer, 6), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(blend_hessian(None, 0, h_layer), h_layer)
    with pytest.raises(ValueError):
        blend_hessian(h_few, -1, h_layer)
    spec = MWQSpec(2, (2, 4))
    own = quantize_mwq(w, spec, h_few)
    blended = quantize_mwq(w, spec, blend_hessian(h_few, 2, h_layer))
    top = spec.num_levels - 1
    assert out_err(w, reconstruct(blended, 64, top), h_layer) < out_err(w, reconstruct(own, 64, top), h_layer)


def test_hessian_blocks_give_the_same_fit_as_the_full_hessian():
    """The converter passes only H's diagonal blocks (what every fit but GPTQ reads)."""
    from d2moe_mlx.mwq import hessian_blocks

    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, (64, 256)) * 0.02).astype(np.float32)
    x = (rng.standard_normal((300, 256)) * (1 + 3 * rng.random(256))).astype(np.float32)
    full = (x.astype(np.float64).T @ x / len(x)).astype(np.float32)
    blocks = hessian_blocks(x, 64).astype(np.float32)
    np.testing.assert_allclose(blocks[1], full[64:128, 64:128], rtol=1e-5, atol=1e-6)
    for method in ("ls", "greedy", "nested"):
        a = quantize_mwq(w, DEFAULT_SPEC, full, method=method)
        b = quantize_mwq(w, DEFAULT_SPEC, blocks, method=method)
        for ca, cb in zip(a, b):
            np.testing.assert_array_equal(ca.codes, cb.codes)
            np.testing.assert_array_equal(ca.scales, cb.scales)
    with pytest.raises(ValueError, match="full"):
        quantize_mwq(w, DEFAULT_SPEC, blocks, method="gptq")
    with pytest.raises(ValueError, match="does not match"):
        quantize_mwq(w, DEFAULT_SPEC, blocks[:2])
