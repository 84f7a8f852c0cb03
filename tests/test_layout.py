"""Slot layouts: a ``levels`` part (components packed into one tensor) computes exactly
what the sum of its components computes (numpy reconstruction of the MWQ fit), and a
store that was not fitted nested is refused with a clear message."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx import mwq
from d2moe_mlx.layout import build_part, make_layout
from d2moe_mlx.packing import pack_component
from d2moe_mlx.store.format import StoreError

SPECS = {"2,4,8": mwq.MWQSpec(2, (2, 4), 64), "2,3,4": mwq.MWQSpec(2, (1, 1), 64),
         "3,6": mwq.MWQSpec(3, (3,), 32), "4,8": mwq.MWQSpec(4, (4,), 128)}


def _blocks(spec, method, seed=0, out=48, inp=256):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(out, inp)) * 0.02).astype(np.float32)
    comps = mwq.quantize_mwq(w, spec, method=method)
    blocks = {c: {f"up_proj.{k}": v for k, v in pack_component(comp).items()}
              for c, comp in enumerate(comps)}
    return comps, blocks


def _dequant(t, bits, gs):
    return np.array(mx.dequantize(mx.array(t["up_proj.weight"]), mx.array(t["up_proj.scales"]),
                                  mx.array(t["up_proj.biases"]), group_size=gs, bits=bits))


@pytest.mark.parametrize("name", SPECS)
def test_levels_part_equals_the_sum_of_its_components(name):
    spec = SPECS[name]
    comps, blocks = _blocks(spec, "nested")
    layout = make_layout("levels", spec)
    for part in layout.parts:
        got = _dequant(build_part(part, spec, blocks, "test"), part.bits, spec.group_size)
        want = mwq.reconstruct(comps, spec.group_size, part.hi)
        assert np.allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max()), (name, part)
    planes = make_layout("planes", spec)
    for level in range(spec.num_levels):
        total = sum(_dequant(build_part(planes.parts[p], spec, blocks, "t"), planes.parts[p].bits,
                             spec.group_size) for p in planes.cover(level))
        assert np.allclose(total, mwq.reconstruct(comps, spec.group_size, level), atol=1e-6)


def test_a_plane_switched_off_in_a_group_still_packs():
    spec = SPECS["2,4,8"]
    comps, blocks = _blocks(spec, "nested", seed=3)
    blocks[1]["up_proj.scales"][0, 1] = 0  # the fit may zero a plane that makes a group worse
    blocks[1]["up_proj.biases"][0, 1] = 0
    comps[1].scales[0, 1] = 0
    comps[1].biases[0, 1] = 0
    part = make_layout("levels", spec).parts[1]
    got = _dequant(build_part(part, spec, blocks, "test"), part.bits, spec.group_size)
    assert np.allclose(got, mwq.reconstruct(comps, spec.group_size, 1), atol=1e-6)


def test_components_that_are_not_nested_are_refused():
    spec = SPECS["2,4,8"]
    _, blocks = _blocks(spec, "greedy")
    part = make_layout("levels", spec).parts[1]
    with pytest.raises(StoreError, match="not nested.*--method nested.*planes"):
        build_part(part, spec, blocks, "L001.c1.bin")


def _bf16(a):
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def test_a_level_derived_from_a_bf16_slot_packs_like_a_fresh_one():
    """A raised level reads only the planes above and packs them onto the lower level
    already in a slot; in a 16-bit activation dtype that slot's scales are rounded (the
    H200 run refused them as 'not nested'). The derived part equals the fresh one up to
    that rounding; a prefix that is really off still fails."""
    spec = SPECS["2,4,8"]
    comps, blocks = _blocks(spec, "nested", seed=5)
    layout = make_layout("levels", spec)
    low, high = layout.parts[0], layout.parts[1]
    slot = {k: (_bf16(v) if v.dtype != np.uint32 else v)
            for k, v in build_part(low, spec, blocks, "t").items()}
    got = build_part(high, spec, blocks, "t", (low, slot))
    fresh = build_part(high, spec, blocks, "t")
    assert np.array_equal(got["up_proj.weight"], fresh["up_proj.weight"])
    assert np.array_equal(got["up_proj.scales"], fresh["up_proj.scales"])  # the disk's step
    want = _dequant(fresh, high.bits, spec.group_size)
    assert np.allclose(_dequant(got, high.bits, spec.group_size), want,
                       atol=1e-2 * np.abs(want).max())
    slot["up_proj.scales"] = slot["up_proj.scales"] * 1.05
    with pytest.raises(StoreError, match="not nested"):
        build_part(high, spec, blocks, "t", (low, slot))


def test_levels_need_mlx_widths():
    with pytest.raises(ValueError, match="7 bits.*planes"):
        make_layout("levels", mwq.MWQSpec(5, (1, 1, 1), 64))
    assert make_layout("planes", mwq.MWQSpec(5, (1, 1, 1), 64)).cover(2) == (0, 1, 2)


@pytest.mark.parametrize("widths,total", [((2, 2), 4), ((2, 2, 4), 8), ((4, 4), 8), ((1, 1), 2),
                                          ((2, 1, 1), 4), ((2, 1), 3), ((3, 3), 6), ((1, 1, 1, 1, 4), 8)])
def test_concat_codes_on_words_equals_per_weight_codes(widths, total):
    from d2moe_mlx.packing import concat_codes, pack_codes, unpack_codes

    rng = np.random.default_rng(sum(widths))
    n = 192
    codes = [rng.integers(0, 2**b, (5, n)).astype(np.uint8) for b in widths]
    words = [pack_codes(c, b) for c, b in zip(codes, widths)]
    q, shift = np.zeros((5, n), np.uint16), total
    for c, b in zip(codes, widths):
        shift -= b
        q |= c.astype(np.uint16) << shift
    got = concat_codes(list(zip(words, widths)), total)
    assert np.array_equal(unpack_codes(got, total, n), q)


def test_return_freed_memory_is_glibc_only(monkeypatch):
    from d2moe_mlx import system

    monkeypatch.setattr(system, "_platform", lambda: "darwin")
    assert system.return_freed_memory() is False


def test_trim_heap_is_glibc_only(monkeypatch):
    import platform
    import sys

    from d2moe_mlx import system

    assert system.trim_heap() is (sys.platform == "linux" and platform.libc_ver()[0] == "glibc")
    monkeypatch.setattr(system, "_platform", lambda: "darwin")
    assert system.trim_heap() is False
