"""The shipped tiny MoE (d2moe_mlx/assets/tiny-moe): loads in transformers and
mlx-lm with matching logits, generates text, and the routing-trace recorder
agrees with an independent top-k of the router logits."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ASSET = Path(__file__).resolve().parents[1] / "d2moe_mlx" / "assets" / "tiny-moe"
PROMPT = "The dictionary is a built-in type that maps keys to values. To open a file, use"
ATOL = 1e-4  # float32 both sides; measured max |diff| ~1e-6


@pytest.fixture(scope="module")
def mlx_model():
    import mlx_lm

    cfg = json.loads((ASSET / "config.json").read_text())
    try:  # the project's normaliser, where present; config.json also has rope_theta
        from d2moe_mlx.convert.hf_config import normalize_config
        cfg = normalize_config(cfg)
    except ImportError:
        pass
    model, tok = mlx_lm.load(str(ASSET), model_config=cfg)
    model.set_dtype(mx.float32)  # CPU gather_mm runs float32 only
    return model, tok


def test_checkpoint_files_and_size():
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["rope_theta"] > 0
    assert 16 <= cfg["num_experts"] <= 64 and 2 <= cfg["num_experts_per_tok"] <= 8
    assert cfg["hidden_size"] % 128 == 0 and cfg["moe_intermediate_size"] % 128 == 0
    assert cfg["mlp_only_layers"] == [] and cfg["decoder_sparse_step"] == 1
    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size <= 25_000_000, size
    tc = json.loads((ASSET / "tokenizer_config.json").read_text())
    assert tc["eos_token"] and tc["chat_template"]


def test_hf_and_mlx_logits_agree(mlx_model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSET), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(ASSET))
    ids = tok(PROMPT).input_ids
    model, mtok = mlx_model
    assert list(mtok.encode(PROMPT)) == ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    out = np.array(model(mx.array([ids]))[0])
    assert out.shape == ref.shape == (len(ids), 6144)
    diff = np.abs(out - ref).max()
    assert diff <= ATOL, f"HF vs mlx-lm logits differ by {diff}"


def test_greedy_generation_makes_text(mlx_model):
    import mlx_lm

    model, tok = mlx_model
    text = mlx_lm.generate(model, tok, "To open a file, use", max_tokens=20)
    assert text.strip(), "empty generation"
    assert sum(c.isalpha() for c in text) >= 10, text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|assistant|>\n")


def test_trace_matches_router_topk(mlx_model, tmp_path):
    from d2moe_mlx.trace import load_trace, record_trace

    model, tok = mlx_model
    text = (ASSET.parents[0] / "calib.txt").read_text()[:2000]
    out = tmp_path / "t.npz"
    tr = record_trace(model, tok, text, out, max_tokens=96, chunk=40)
    meta = tr["meta"]
    L, k, E = len(model.layers), meta["k"], meta["num_experts"]
    assert (meta["model_type"], E, k, meta["layers"]) == ("qwen3_moe", 32, 4, list(range(L)))
    loaded = load_trace(out)
    assert loaded["ids"].shape == (L, 96, k) and loaded["scores"].dtype == np.float32
    assert np.array_equal(loaded["ids"], tr["ids"]) and loaded["meta"] == meta
    # the model's modules are restored
    assert type(model.layers[0].mlp.gate).__name__ == "Linear"
    assert type(model.layers[0].mlp.switch_mlp).__name__ == "SwitchGLU"

    # independent recomputation: run the layers by hand, top-k of the router logits
    tokens = mx.array(tr["tokens"])[None]
    from mlx_lm.models.base import create_attention_mask
    h = model.model.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    for i, layer in enumerate(model.layers):
        x = layer.input_layernorm(h + 0)
        h = h + layer.self_attn(x, mask, None)
        logits = np.array(layer.mlp.gate(layer.post_attention_layernorm(h)))[0]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :k]
        assert np.array_equal(np.sort(top, -1), np.sort(tr["ids"][i].astype(np.int64), -1)), i
        assert np.allclose(np.take_along_axis(p, tr["ids"][i].astype(np.int64), -1),
                           tr["scores"][i], atol=1e-5)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    assert np.all(np.diff(tr["scores"], axis=-1) <= 0)  # highest score first


_BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, rope_theta=10000.0,
             max_position_embeddings=256, tie_word_embeddings=False)
_FAMILIES = {  # tiny random mlx-lm models: (extra args, MoE layers, scoring)
    "mixtral": (dict(num_local_experts=8, num_experts_per_tok=2), [0, 1], "softmax"),
    "deepseek_v3": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
                         qk_nope_head_dim=8, n_group=1, topk_group=1,
                         routed_scaling_factor=1.0, norm_topk_prob=True,
                         topk_method="noaux_tc", scoring_func="sigmoid",
                         num_hidden_layers=3), [1, 2], "sigmoid"),
    "gpt_oss": (dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=32,
                     layer_types=["sliding_attention", "full_attention"]), [0, 1], "softmax"),
    # granitemoe's gating returns (indices, gates) and keeps its Linear in .layer
    "granitemoe": (dict(num_local_experts=8, num_experts_per_tok=2, logits_scaling=1.0,
                        attention_multiplier=0.25, embedding_multiplier=1.0,
                        residual_multiplier=1.0, attention_bias=False), [0, 1], "softmax"),
}


class _CharTok:
    def encode(self, s):
        return [ord(c) % 64 for c in s]


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_trace_other_families(family):
    import importlib

    from d2moe_mlx.trace import record_trace

    extra, layers, scoring = _FAMILIES[family]
    mod = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(0)
    model = mod.Model(mod.ModelArgs.from_dict({**_BASE, **extra, "model_type": family}))
    model.set_dtype(mx.float32)
    x = mx.array(_CharTok().encode("routing test text " * 3))[None]
    before = np.array(model(x))
    tr = record_trace(model, _CharTok(), "routing test text " * 3, chunk=20)
    assert tr["meta"]["layers"] == layers and tr["meta"]["scoring"] == scoring
    assert tr["ids"].shape == (len(layers), x.shape[1], 2)
    assert ((tr["ids"] >= 0) & (tr["ids"] < 8)).all()
    assert np.array_equal(before, np.array(model(x)))  # hooks removed
