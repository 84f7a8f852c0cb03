"""The offline profile: read and compute time per level, measured once per store, device
and dtype and cached; a loaded model's scheduler gets the cached costs."""

from __future__ import annotations

import json

import pytest

from d2moe_mlx import mwq
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.profile import cache_path, profile
from d2moe_mlx.store.reader import Store


@pytest.fixture(scope="module")
def store(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "store"
    return convert(hf_checkpoint("qwen3_moe"), out, dense_bits=0, dtype="float32", calib_tokens=64,
                   seq_len=32).path


def test_profile_measures_every_level_and_is_cached(store, tmp_path, monkeypatch):
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    prof = profile(store, samples=4, repeats=2)
    with Store.open(store) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        layer = s.moe_layers[len(s.moe_layers) // 2]
        want = [sum(s.block_bytes(layer, c) for c in range(lv + 1)) for lv in range(spec.num_levels)]
        path = cache_path(s, prof.device, "float32")
    assert prof.bytes == want
    assert len(prof.read_s) == len(prof.compute_s) == len(prof.component_read_s) == spec.num_levels
    assert all(t > 0 for t in prof.read_s + prof.compute_s + prof.component_read_s)
    assert json.loads(path.read_text())["bytes"] == want
    path.write_text(json.dumps({**json.loads(path.read_text()), "compute_s": [9.0, 9.0, 9.0]}))
    assert profile(store).compute_s == [9.0, 9.0, 9.0]  # read from the cache, not measured
    assert profile(store, refresh=True, samples=2, repeats=1).compute_s != [9.0, 9.0, 9.0]


def test_a_loaded_model_gets_the_cached_costs(store, tmp_path, monkeypatch):
    from d2moe_mlx.engine import engine_of
    from d2moe_mlx.model import load_model

    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path))
    model, _ = load_model(store, dtype="float32", quality="fast")
    assert engine_of(model).scheduler.costs is None  # never profiled: no stall budget
    prof = profile(store, samples=2, repeats=1)
    model, _ = load_model(store, dtype="float32", quality="fast")
    assert engine_of(model).scheduler.costs == prof
    assert engine_of(model).policy.stall == 1.0
