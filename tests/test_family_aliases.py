"""model_type aliases (mlx-lm's MODEL_REMAPPING): a checkpoint whose config names an alias
converts and runs through the adapter of the family mlx-lm maps it to."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx import load_model
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.convert.hf_config import check_supported, load_mlx_reference
from d2moe_mlx.families import alias_table, family_of, get_family, supported
from d2moe_mlx.store.reader import Store

TOKENS = mx.array([[3, 17, 42, 99, 5, 63, 120, 7, 88, 31, 2, 77, 19, 54, 101, 11]])
# as test_runtime_parity: the top level's logits stay this close to full precision
TOP_LEVEL_REL_ERR = 0.02
# the hub's Kimi-K2 config.json points at its own DeepSeek-V3 code
KIMI_K2_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def test_aliases_resolve_to_their_family_under_their_own_name():
    table = alias_table()
    assert table["kimi_k2"] == table["joyai_llm_flash"] == "deepseek_v3"
    assert table["deepseek_v41_text"] == "deepseek_v41"
    assert "minimax_m2" not in table  # a family of its own here, although mlx-lm remaps it
    assert "mistral" not in table  # mlx-lm maps it to llama, which is not an MoE family
    for alias, target in table.items():
        family = get_family(alias)
        assert family is get_family(alias) and family.name == alias and alias not in supported()
        assert (family.rule, family.switch_path) == (get_family(target).rule,
                                                     get_family(target).switch_path)
    with pytest.raises(ValueError, match="'mistral' is not supported.*aliases.*kimi_k2"):
        get_family("mistral")
    assert check_supported({"model_type": "kimi_k2", "auto_map": KIMI_K2_AUTO_MAP}) == "kimi_k2"


def _logits(model) -> np.ndarray:
    out = model(TOKENS).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


@pytest.mark.parametrize("alias,family", [("kimi_k2", "deepseek_v3"),
                                          ("deepseek_v41_text", "deepseek_v41")])
def test_alias_checkpoint_converts_and_runs(alias, family, hf_checkpoint, tmp_path):
    src = hf_checkpoint(family)
    ckpt = shutil.copytree(src, tmp_path / alias)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = alias
    if alias == "kimi_k2":
        config["auto_map"] = KIMI_K2_AUTO_MAP
    (ckpt / "config.json").write_text(json.dumps(config))

    store = convert(ckpt, tmp_path / "store", dense_bits=0, dtype="float32", calib_tokens=32,
                    seq_len=16)
    with Store.open(store.path) as opened:
        assert opened.manifest["model_type"] == alias
    ours, _ = load_model(store.path, dtype="float32")
    assert family_of(ours).name == alias
    ref, _ = load_mlx_reference(src)
    want = _logits(ref)
    err = np.linalg.norm(_logits(ours) - want) / np.linalg.norm(want)
    assert err <= TOP_LEVEL_REL_ERR, f"{alias}: relative logit error {err}"


# last: the CLI makes torch unimportable for the rest of the session (d2moe_mlx/cli.py)
def test_list_families_names_the_aliases():
    from click.testing import CliRunner

    from d2moe_mlx.cli import main

    result = CliRunner().invoke(main, ["convert", "--list-families"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("aliases"))
    assert "kimi_k2 -> deepseek_v3" in line and "deepseek_v41_text -> deepseek_v41" in line
