"""scripts/make_synthetic_store.py: a random-weight store that verifies, loads and runs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from make_synthetic_store import main, make_synthetic_store

from d2moe_mlx import mwq
from d2moe_mlx.model import load_model
from d2moe_mlx.store.format import BLOCK_ALIGN, TENSOR_ALIGN, round_up
from d2moe_mlx.store.reader import Store

TINY = {"layers": 2, "hidden": 128, "moe_intermediate": 64, "experts": 8, "top_k": 2}


def expected_layer_bytes(spec: mwq.MWQSpec, hidden: int, inter: int, experts: int) -> int:
    """Bytes of one layer's expert files, from the projection shapes and the format's alignment rules."""
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]  # gate, up, down: [out, in]
    total = 0
    for c in range(spec.num_levels):
        bits, end = spec.component_bits(c), 0
        for out, inp in shapes:
            groups = out * inp // spec.group_size
            sizes = [out * inp * bits // 8, groups * 2] + ([groups * 2] if bits > 1 else [])
            for n in sizes:
                end = round_up(end, TENSOR_ALIGN) + n
        total += experts * round_up(round_up(end, TENSOR_ALIGN), BLOCK_ALIGN)
    return total


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("synth") / "store", **TINY)


def test_verifies_and_runs(store):
    with Store.open(store) as s:
        assert s.verify() == []
        assert s.manifest["source"] == "synthetic"
        assert s.manifest["num_experts"] == TINY["experts"]
    model, config = load_model(store)
    assert config["vocab_size"] == 6144 and config["num_experts_per_tok"] == TINY["top_k"]
    tokens = mx.array([[1, 17, 300, 4000, 42, 5]])
    logits = model(tokens)
    mx.eval(logits)
    assert logits.shape == (1, 6, config["vocab_size"])
    assert mx.isfinite(logits).all().item()
    assert logits.std().item() > 1e-3  # not degenerate
    # The router spreads tokens over experts.
    h = model.model.embed_tokens(tokens)
    mlp = model.model.layers[0].mlp
    gates = mlp.gate(model.model.layers[0].post_attention_layernorm(h))
    assert len(set(np.array(mx.argmax(gates, axis=-1)).ravel().tolist())) > 1


@pytest.mark.parametrize("spec, dense_bits", [(mwq.DEFAULT_SPEC, 8), (mwq.MWQSpec(2, (1, 1), 32), 0)])
def test_expert_bytes_match_spec(tmp_path, spec, dense_bits):
    store_path = make_synthetic_store(tmp_path / "s", **TINY, spec=spec, dense_bits=dense_bits)
    want = expected_layer_bytes(spec, TINY["hidden"], TINY["moe_intermediate"], TINY["experts"])
    for layer in range(TINY["layers"]):
        files = sorted((store_path / "experts").glob(f"L{layer:03d}.c*.bin"))
        assert len(files) == spec.num_levels
        assert sum(f.stat().st_size for f in files) == want
    with Store.open(store_path) as s:
        assert s.manifest["mwq"] == {**spec.to_dict(), "nested": True}


@pytest.mark.parametrize("spec", [mwq.DEFAULT_SPEC, mwq.MWQSpec(2, (1, 1), 32)])
def test_components_are_nested_so_the_levels_layout_runs_it(tmp_path, spec):
    """The levels layout packs the synthetic components (it checks the scales per group);
    level k equals the sum of components 0..k."""
    from d2moe_mlx.engine import engine_of
    from d2moe_mlx.layout import build_part, make_layout

    store_path = make_synthetic_store(tmp_path / "s", **TINY, spec=spec, dense_bits=0)
    model, _ = load_model(store_path, layout="levels", dtype="float32")
    assert engine_of(model).layout.kind == "levels"
    with Store.open(store_path) as s:
        blocks = {c: s.read_block(0, c, 3) for c in range(spec.num_levels)}
    planes, levels = make_layout("planes", spec), make_layout("levels", spec)
    top = levels.parts[-1]
    packed = build_part(top, spec, blocks, "test")
    w = mx.dequantize(mx.array(packed["up_proj.weight"]), mx.array(packed["up_proj.scales"]),
                      mx.array(packed["up_proj.biases"]), group_size=spec.group_size, bits=top.bits)
    total = sum(mx.dequantize(*(mx.array(t[f"up_proj.{k}"]) for k in ("weight", "scales", "biases")),
                              group_size=spec.group_size, bits=part.bits)
                for part in planes.parts
                for t in [build_part(part, spec, blocks, "test")])
    assert np.allclose(np.array(w), np.array(total), atol=1e-6)


def test_refuses_existing_output(tmp_path, capsys):
    store = make_synthetic_store(tmp_path / "s", **TINY)
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_store(store, **TINY)
    args = [str(store), "--layers", "2", "--hidden", "128", "--moe-intermediate", "64",
            "--experts", "8", "--top-k", "2"]
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        main(args)
    main(args + ["--overwrite", "--seed", "1"])
    assert "wrote" in capsys.readouterr().out
    with Store.open(store) as s:
        assert s.verify() == []
