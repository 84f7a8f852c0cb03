"""Runtime parity for every supported family (CPU, float32 activations).

(a) our runtime at level k == mlx-lm's own model whose expert weights are set
    to the level-k MWQ reconstruction (decoded independently with numpy);
(b) at the top level, our logits stay close to mlx-lm's full-precision logits,
    and the distance shrinks level by level.
Transformers vs mlx-lm parity (c) lives in test_hf_parity.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from make_test_checkpoints import FAMILIES, make_checkpoint

from d2moe_mlx import load_model, mwq
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.convert.hf_config import load_mlx_reference
from d2moe_mlx.experts import ExpertLayer
from d2moe_mlx.moe import layer_of, projection_names, switch_modules
from d2moe_mlx.store.reader import Store

# (a) is the same maths computed two ways (gather_qmm on packed codes vs a
# dense matmul on numpy-decoded weights): float32 rounding only (seen: <= 1.1e-6).
LEVEL_MATCH_ATOL = 2e-5
# (b) relative L2 distance of the top level's logits to full precision on the
# random tiny models, default levels 2 -> 4 -> 8 bits, dense weights unquantized
# (seen: 0.0007 granitemoe .. 0.0048 deepseek_v3 at the top level).
TOP_LEVEL_REL_ERR = 0.02

TOKENS = mx.array([[3, 17, 42, 99, 5, 63, 120, 7, 88, 31, 2, 77, 19, 54, 101, 11]])


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    ckpt = make_checkpoint(family, root / "hf")
    store = convert(ckpt, root / "store", dense_bits=0, dtype="float32", calib_tokens=256, seq_len=32)
    return family, ckpt, store.path


def _reference_at_level(ckpt, store_path, level):
    """mlx-lm's model with each expert stack replaced by numpy's level-``level`` reconstruction."""
    model, _ = load_mlx_reference(ckpt)
    model.set_dtype(mx.float32)
    with Store.open(store_path) as store:
        spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
        for path, switch in switch_modules(model):
            layer = layer_of(path)
            stacks = [store.read_expert_stack(layer, c) for c in range(level + 1)]
            for name in projection_names(switch):
                proj = getattr(switch, name)
                num_experts, out_dims, in_dims = proj.weight.shape
                rebuilt = np.zeros((num_experts, out_dims, in_dims), np.float32)
                for e in range(num_experts):
                    comps = []
                    for c, stack in enumerate(stacks):
                        bits = spec.component_bits(c)
                        packed = {k.split(".", 1)[1]: v[e] for k, v in stack.items() if k.startswith(name + ".")}
                        packed.pop("bias", None)
                        comps.append(mwq.unpack_component(packed, bits, (out_dims, in_dims)))
                    rebuilt[e] = mwq.reconstruct(comps, spec.group_size, level)
                proj.weight = mx.array(rebuilt)
    return model


def _logits(model):
    out = model(TOKENS).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def test_levels_match_mlx_lm_with_reconstructed_experts(converted):
    family, ckpt, store_path = converted
    with Store.open(store_path) as store:
        num_levels = mwq.MWQSpec.from_dict(store.manifest["mwq"]).num_levels
    for level in range(num_levels):
        ours, _ = load_model(store_path, level=level, dtype="float32")
        assert any(isinstance(m, ExpertLayer) for _, m in ours.named_modules())
        got = _logits(ours)
        want = _logits(_reference_at_level(ckpt, store_path, level))
        diff = np.abs(got - want).max()
        assert diff <= LEVEL_MATCH_ATOL * max(1.0, np.abs(want).max()), f"{family} level {level}: {diff}"


def test_top_level_close_to_full_precision(converted):
    family, ckpt, store_path = converted
    ref, _ = load_mlx_reference(ckpt)
    ref.set_dtype(mx.float32)
    full = _logits(ref)
    with Store.open(store_path) as store:
        num_levels = mwq.MWQSpec.from_dict(store.manifest["mwq"]).num_levels
    errors = []
    for level in range(num_levels):
        ours, _ = load_model(store_path, level=level, dtype="float32")
        errors.append(np.linalg.norm(_logits(ours) - full) / np.linalg.norm(full))
    assert errors[-1] <= TOP_LEVEL_REL_ERR, f"{family}: relative logit error per level {errors}"
    assert all(b < a for a, b in zip(errors, errors[1:])), f"{family}: error not decreasing {errors}"
