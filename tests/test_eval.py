"""The quality harness: its perplexity, KL and agreement against a numpy computation from
the model's own logits; exact at the top level is the reference; a lower level or a
preset costs something; a memory budget (cold fresh loads) gives exact's numbers; the
CLI's table, JSON and one-line errors; the trained tiny model."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.cli import main
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.evaluate import EvalResult, Scores, evaluate, tokenize
from d2moe_mlx.model import load
from d2moe_mlx.store.reader import Store

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs."
KEYS = {"quality", "level", "perplexity", "ppl_delta", "kl_to_top", "agreement", "level_mix",
        "substitution_rate", "hit_rate", "tokens", "memory_budget", "experts_cached"}


@pytest.fixture(scope="module")
def store(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "store"
    return convert(hf_checkpoint("qwen3_moe"), out, method="rtn", dense_bits=0, dtype="float32",
                   calib_tokens=64, seq_len=32).path


def _logprobs(logits: mx.array) -> np.ndarray:
    x = np.array(logits.astype(mx.float32), dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _full_forward(path, tokens, **kw) -> np.ndarray:
    """Log-probabilities of one forward pass over tokens[:-1] (no cache), [n-1, V]."""
    model, _ = load(path, dtype="float32", **kw)
    return _logprobs(model(mx.array([tokens[:-1]]))[0])


def _numbers(run: np.ndarray, ref: np.ndarray, targets: np.ndarray):
    n = len(targets)
    ppl = float(np.exp(-run[np.arange(n), targets].mean()))
    kl = float((np.exp(ref) * (ref - run)).sum(-1).mean())
    agree = float((run.argmax(-1) == ref.argmax(-1)).mean())
    return ppl, kl, agree


def _tokens(path, n):
    _, tokenizer = load(path, dtype="float32")
    return tokenize(tokenizer, TEXT, n)


def test_prefill_numbers_equal_numpy_from_the_models_logits(store):
    """One chunk (prefill) makes the same MoE calls as one forward pass: perplexity, KL
    and agreement equal numpy's from those logits, for exact and a lower quality."""
    tokens = _tokens(store, 24)
    targets = np.asarray(tokens[1:])
    ref = _full_forward(store, tokens)
    fast = _full_forward(store, tokens, quality="fast")
    results = evaluate(store, TEXT, ["fast", "exact"], max_tokens=24, mode="prefill", dtype="float32")
    assert [r.quality for r in results] == ["fast", "exact"]
    got_fast, got_exact = results
    ppl_ref, kl0, agree0 = _numbers(ref, ref, targets)
    ppl, kl, agree = _numbers(fast, ref, targets)
    assert got_exact.perplexity == pytest.approx(ppl_ref, rel=1e-4)
    assert got_exact.kl_to_top == 0.0 and got_exact.agreement == 1.0 and got_exact.ppl_delta == 0.0
    assert got_fast.perplexity == pytest.approx(ppl, rel=1e-4)
    assert got_fast.kl_to_top == pytest.approx(kl, rel=1e-2) and kl > 1e-5
    assert got_fast.agreement == pytest.approx(agree)
    assert got_fast.ppl_delta == pytest.approx(ppl / ppl_ref - 1, rel=1e-3, abs=1e-6)
    assert got_fast.tokens == len(targets) == 23
    assert set(got_fast.level_mix) == {0, 2} or set(got_fast.level_mix) == {0, 1, 2}
    assert abs(sum(got_fast.level_mix.values()) - 1) < 1e-9 and got_fast.level_mix[0] > 0
    assert got_exact.level_mix == {2: 1.0} and got_exact.hit_rate == 1.0
    assert got_exact.memory_budget is None and got_exact.experts_cached is None


def test_decode_exact_equals_a_full_forward_and_a_lower_level_costs(store):
    """Decode (one token a pass, KV cache) at the top level gives the causal forward
    pass's perplexity; exact at level 0 has KL > 0 and ppl_delta 0 against itself."""
    tokens = _tokens(store, 12)
    targets = np.asarray(tokens[1:])
    ref = _full_forward(store, tokens)
    low = _full_forward(store, tokens, level=0)
    top, = evaluate(store, TEXT, ["exact"], max_tokens=12, dtype="float32")
    assert top.perplexity == pytest.approx(_numbers(ref, ref, targets)[0], rel=1e-4)
    l0, = evaluate(store, TEXT, ["exact"], level=0, max_tokens=12, dtype="float32")
    ppl, kl, agree = _numbers(low, ref, targets)
    assert l0.level == 0 and l0.level_mix == {0: 1.0} and l0.ppl_delta == 0.0
    assert l0.perplexity == pytest.approx(ppl, rel=1e-4)
    assert l0.kl_to_top == pytest.approx(kl, rel=1e-2) and kl > 1e-5
    assert l0.agreement == pytest.approx(agree)


def test_under_a_memory_budget_runs_start_cold_and_exact_matches_resident(store, monkeypatch):
    from d2moe_mlx.budget import budget_for_slots
    from d2moe_mlx.engine import choose_layout
    from d2moe_mlx.layout import make_layout

    baseline = 64 << 20
    monkeypatch.setattr(d2model, "current_rss_bytes", lambda: baseline)
    with Store.open(store) as s:
        spec = mwq.MWQSpec.from_dict(s.manifest["mwq"])
        lay = make_layout(choose_layout("auto", spec, s.manifest, True), spec)
        budget = budget_for_slots(3, s, lay, 2, 4, baseline, context=64, prefill_step=16)
    resident = evaluate(store, TEXT, ["exact", "balanced"], max_tokens=12, dtype="float32")
    streamed = evaluate(store, TEXT, ["exact", "balanced"], max_tokens=12, memory_budget=budget,
                        dtype="float32", context=64, prefill_step=16)
    assert streamed[0].perplexity == pytest.approx(resident[0].perplexity, rel=1e-4)
    assert streamed[0].kl_to_top == 0.0 and streamed[0].experts_cached == 3 / 8
    assert 0 < streamed[0].hit_rate < 1 and streamed[0].memory_budget == budget
    bal = streamed[1]
    assert bal.hit_rate < 1 and bal.kl_to_top > 0 and set(bal.level_mix) <= {1, 2}
    # a second identical call starts from the same (cold) state: the same numbers
    again = evaluate(store, TEXT, ["balanced"], max_tokens=12, memory_budget=budget,
                     dtype="float32", context=64, prefill_step=16)[0]
    a, b = again.to_dict(), bal.to_dict()
    for key in ("perplexity", "kl_to_top"):  # (loads landing in other waves may round apart)
        assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-5)
    assert a == b


def test_scores_accumulate_over_chunks():
    rng = np.random.default_rng(0)
    a, b = (_logprobs(mx.array(rng.normal(size=(7, 11)).astype(np.float32))) for _ in range(2))
    t = rng.integers(0, 11, 7)
    s = Scores()
    s.add(a[:3], b[:3], t[:3])
    s.add(a[3:], b[3:], t[3:])
    ppl, kl, agree = _numbers(a, b, t)
    assert s.perplexity == pytest.approx(ppl) and s.kl / s.n == pytest.approx(kl)
    assert s.agree / s.n == pytest.approx(agree) and s.n == 7


def test_cli_table_and_json(store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(store), "--text", str(text), "--quality", "exact",
                               "--quality", "high", "--max-tokens", "10", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("["):])
    assert [r["quality"] for r in rows] == ["exact", "high"]
    assert all(set(r) == KEYS for r in rows) and rows[0]["tokens"] == 9
    assert set(EvalResult.__dataclass_fields__) == KEYS
    res = runner.invoke(main, ["eval", str(store), "--text", str(text), "--quality", "fast",
                               "--max-tokens", "6", "--mode", "prefill"])
    assert res.exit_code == 0, res.output
    header, row = res.output.strip().splitlines()[-2:]
    assert header.split()[:4] == ["quality", "level", "ppl", "ppl"] and row.split()[0] == "fast"


@pytest.mark.parametrize("args, content, message", [
    (["--quality", "best"], TEXT, "unknown quality 'best'; choose one of exact, high"),
    (["--level", "3"], TEXT, "level 3 does not exist in"),
    ([], "   \n", "is empty"),
    ([], "x", "scoring needs at least 2 tokens"),
    (["--mode", "beam"], TEXT, "Invalid value for '--mode'"),
])
def test_cli_bad_input_is_one_error_line(store, tmp_path, args, content, message):
    text = tmp_path / "t.txt"
    text.write_text(content)
    res = CliRunner().invoke(main, ["eval", str(store), "--text", str(text), *args])
    assert res.exit_code != 0 and message in res.output, res.output
    assert [line for line in res.output.splitlines() if line.startswith("Error:")].__len__() == 1
    assert "Traceback" not in res.output


def test_cli_missing_text_file(store, tmp_path):
    res = CliRunner().invoke(main, ["eval", str(store), "--text", str(tmp_path / "none.txt")])
    assert res.exit_code == 1 and res.output.strip() == f"Error: text file {tmp_path / 'none.txt'} does not exist"


def test_api_bad_input(store):
    with pytest.raises(ValueError, match="mode must be one of decode, prefill"):
        evaluate(store, TEXT, mode="beam")
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        evaluate(store, TEXT, max_tokens=1)
    with pytest.raises(ValueError, match="no quality to evaluate"):
        evaluate(store, TEXT, [])
    with pytest.raises(ValueError, match="level -1 does not exist"):
        evaluate(store, TEXT, level=-1)


def test_trained_tiny_model(tmp_path_factory):
    """The bundled trained MoE: exact scores the held-out text far better than chance, and
    balanced runs two levels with a small cost."""
    from importlib import resources

    from d2moe_mlx.demo import bundled_model

    out = tmp_path_factory.mktemp("tiny") / "store"
    path = convert(bundled_model(), out, method="rtn", calib_tokens=64, seq_len=32).path
    text = resources.files("d2moe_mlx").joinpath("assets/calib.txt").read_text()[-3000:]
    exact, balanced = evaluate(path, text, ["exact", "balanced"], max_tokens=32, mode="prefill")
    assert exact.perplexity < 300  # the vocabulary has 6144 tokens
    assert balanced.kl_to_top > 0 and set(balanced.level_mix) == {1, 2}
    assert 0.5 < balanced.agreement <= 1 and abs(balanced.ppl_delta) < 0.5
