"""The budget proof: a fresh process streams a store whose experts are several times
its expert cache (and its whole budget less the interpreter) and its peak RSS stays
within the budget.

The store is synthetic (scripts/make_synthetic_store.py): 4 layers of 128 experts
(hidden 1024, expert intermediate 512, top-2; default MWQ levels 2/4/8 bits:
~912 MiB of experts). Its attention is narrowed to 8 heads of 64 (the script's
Qwen3-30B geometry has 32 of 128) and top-k is 2, so that 200 prompt tokens and 16
decode steps run in ~15 s on MLX's CPU backend, whose quantized matmul is slow;
the expert bytes per layer are what the proof needs, not the attention.

The child process loads with budget = its baseline RSS + dense + KV + working
memory + staging (plan_budget's own numbers) + ~20% of the experts, runs
mlx-lm's generate_step (prefill in steps of 128) and reports VmHWM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

LAYERS, HIDDEN, MOE_INTER, EXPERTS, TOP_K = 4, 1024, 512, 128, 2
CACHE_FRACTION = 0.15  # experts >= 3x (budget - baseline) with the planned working memory
PROMPT_TOKENS, DECODE_TOKENS = 200, 16
CONTEXT, PREFILL_STEP = 512, 128
PEAK_TOLERANCE = 1.05
NON_CACHE_TOLERANCE = 1.15

CHILD = r"""
import json, sys, time
import mlx.core as mx
mx.set_default_device(mx.cpu)
import numpy as np
from mlx_lm.generate import generate_step
from d2moe_mlx import mwq
from d2moe_mlx.budget import plan_budget
from d2moe_mlx.engine import choose_layout, streaming_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.memory import format_bytes, peak_rss_bytes
from d2moe_mlx.model import load_model
from d2moe_mlx.store.reader import Store
from d2moe_mlx.system import current_rss_bytes

path, fraction, prompt_tokens, decode_tokens, context, step = sys.argv[1:7]
fraction, prompt_tokens, decode_tokens = float(fraction), int(prompt_tokens), int(decode_tokens)
context, step = int(context), int(step)
with Store.open(path) as store:
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    level = spec.num_levels - 1
    lay = make_layout(choose_layout("auto", spec, store.manifest, True), spec)
    p = plan_budget(1 << 50, store, store.config, lay, level, 4, current_rss_bytes(),
                    context=context, prefill_step=step)
    expert_bytes = sum(store.block_bytes(l, c) * store.num_experts
                       for l in store.moe_layers for c in range(level + 1))
one = p.layers * sum(p.slot_bytes.values())  # one slot in every layer's pools
slots = max(p.top_k, round(fraction * p.num_experts))
# + half a slot: the baseline load_model measures may be a little above ours
budget = p.baseline + p.dense + p.kv + p.working + (slots + 1) * one + one // 2
t0 = time.perf_counter()
model, config = load_model(path, memory_budget=budget, context=context, prefill_step=step,
                           dtype="float32")
state = streaming_of(model)
load_peak = peak_rss_bytes()
prompt = mx.array(np.random.default_rng(0).integers(3, config["vocab_size"], prompt_tokens))
tokens = [int(t) for t, _ in generate_step(prompt, model, max_tokens=decode_tokens,
                                             prefill_step_size=step)]
seconds = time.perf_counter() - t0
s, plan = state.stats, state.plan
print(plan.describe(), file=sys.stderr)
print(json.dumps(dict(
    budget=budget, total=plan.total, baseline=plan.baseline, dense=plan.dense, kv=plan.kv,
    workspace=plan.workspace, staging=plan.staging, cache_used=plan.cache_used,
    slots=min(plan.slots.values()), num_experts=plan.num_experts, expert_bytes=expert_bytes,
    peak_rss=peak_rss_bytes(), load_peak_rss=load_peak, rss_end=current_rss_bytes(),
    mx_peak=mx.get_peak_memory(), mx_active=mx.get_active_memory(), mx_cache=mx.get_cache_memory(),
    tokens=len(tokens), seconds=seconds, hit_rate=s.hit_rate, bytes_read=s.bytes_read,
    groups=s.groups, steps=s.steps)))
"""


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    import make_synthetic_store as mss

    narrow = mss.synthetic_hf_config

    def config(*args, **kwargs):  # narrower attention: see the module docstring
        cfg = narrow(*args, **kwargs)
        cfg.update(num_attention_heads=8, num_key_value_heads=2, head_dim=64)
        return cfg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mss, "synthetic_hf_config", config)
        return mss.make_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store", layers=LAYERS,
                                        hidden=HIDDEN, moe_intermediate=MOE_INTER, experts=EXPERTS,
                                        top_k=TOP_K)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def test_peak_rss_within_budget_while_streaming(synthetic_store, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    args = [sys.executable, str(script), str(synthetic_store), str(CACHE_FRACTION), str(PROMPT_TOKENS),
            str(DECODE_TOKENS), str(CONTEXT), str(PREFILL_STEP)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    over_baseline = r["budget"] - r["baseline"]
    print(f"\n{run.stderr.strip().splitlines()[-1]}")
    print(f"budget {_mib(r['budget'])} (plan total {_mib(r['total'])}): baseline {_mib(r['baseline'])} "
          f"dense {_mib(r['dense'])} kv {_mib(r['kv'])} workspace {_mib(r['workspace'])} "
          f"staging {_mib(r['staging'])} cache {_mib(r['cache_used'])} "
          f"({r['slots']} of {r['num_experts']} experts per layer)")
    print(f"peak RSS {_mib(r['peak_rss'])} = {r['peak_rss'] / r['budget']:.3f} x budget "
          f"(after load {_mib(r['load_peak_rss'])}, at the end {_mib(r['rss_end'])}); "
          f"MLX peak {_mib(r['mx_peak'])}, active {_mib(r['mx_active'])}, cache {_mib(r['mx_cache'])}")
    print(f"experts {_mib(r['expert_bytes'])} = {r['expert_bytes'] / r['cache_used']:.2f} x the expert "
          f"cache, {r['expert_bytes'] / over_baseline:.2f} x (budget - baseline); read "
          f"{_mib(r['bytes_read'])}, hit rate {r['hit_rate']:.2f}, {r['groups']} grouped calls, "
          f"{r['tokens']} tokens in {r['seconds']:.1f} s")
    assert r["tokens"] == DECODE_TOKENS
    assert r["expert_bytes"] >= 3 * r["cache_used"]
    assert r["expert_bytes"] >= 3 * over_baseline
    assert r["groups"] > 0 and r["hit_rate"] < 1 and r["bytes_read"] > r["cache_used"]
    assert r["mx_peak"] <= PEAK_TOLERANCE * (r["budget"] - r["baseline"])  # MLX's own peak
    assert r["peak_rss"] <= PEAK_TOLERANCE * r["budget"], (
        f"peak RSS {_mib(r['peak_rss'])} is over the budget {_mib(r['budget'])} x {PEAK_TOLERANCE}")
    # An accurate plan: what it reserves besides the expert cache is within 15% of what the
    # process holds besides it, so a user's budget goes to experts (issue: it was ~2x).
    planned, held = r["budget"] - r["cache_used"], r["peak_rss"] - r["cache_used"]
    print(f"non-cache part: planned {_mib(planned)}, held {_mib(held)}: {planned / held:.3f}")
    assert planned <= NON_CACHE_TOLERANCE * held


LONG_CHILD = r"""
import json, sys
import mlx.core as mx
mx.set_default_device(mx.cpu)
import numpy as np
from mlx_lm.generate import stream_generate
import d2moe_mlx.model as d2model
from d2moe_mlx import mwq
from d2moe_mlx.budget import budget_for_slots
from d2moe_mlx.engine import choose_layout, streaming_of
from d2moe_mlx.layout import make_layout
from d2moe_mlx.memory import peak_rss_bytes
from d2moe_mlx.store.reader import Store
from d2moe_mlx.system import current_rss_bytes

path, prompt_tokens, bounded, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
if not bounded:  # the control run: what mlx-lm's default step does to an unbounded model
    d2model.bound_calls = lambda *args, **kwargs: None
opts = dict(context=prompt_tokens + 64, prefill_step=128, batch=batch)
d2model._start_device()
with Store.open(path) as store:
    spec = mwq.MWQSpec.from_dict(store.manifest["mwq"])
    lay = make_layout(choose_layout("auto", spec, store.manifest, True), spec)
    budget = budget_for_slots(store.num_experts // 2, store, lay, spec.num_levels - 1, 4,
                              current_rss_bytes(), **opts)
model, tokenizer = d2model.load(path, memory_budget=budget, dtype="float32", **opts)
prompts = [np.random.default_rng(s).integers(3, 6000, prompt_tokens - 7 * s).tolist() for s in range(batch)]
if batch == 1:  # mlx-lm's own loop and default prefill step
    tokens = [r.token for r in stream_generate(model, tokenizer, prompts[0], max_tokens=4)]
else:  # mlx-lm's BatchGenerator with its defaults (prefill batches of 8, steps of 2048)
    from mlx_lm.generate import batch_generate
    out = batch_generate(model, tokenizer, prompts, max_tokens=4, return_token_ids=True)
    tokens = [t for ids in out.token_ids for t in ids][:4] if all(len(i) == 4 for i in out.token_ids) else []
print(json.dumps(dict(budget=budget, peak_rss=peak_rss_bytes(), tokens=len(tokens),
                      plan=streaming_of(model).plan.describe())))
"""


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from d2moe_mlx.convert.convert import convert
    from d2moe_mlx.demo import bundled_model

    out = tmp_path_factory.mktemp("tiny") / "store"
    return convert(bundled_model(), out, calib_tokens=256, seq_len=64).path


def test_budget_holds_under_mlx_lm_default_prefill_step(tiny_store, tmp_path):
    """mlx-lm's own stream_generate prefills a 2100-token prompt in steps of 2048; the
    model planned for 128-token steps runs them in 128-token chunks and stays within its
    budget. The control run (chunking switched off) does not, so the check can fail."""
    script = tmp_path / "long.py"
    script.write_text(textwrap.dedent(LONG_CHILD))
    results = {}
    for bounded in ("1", "0"):
        run = subprocess.run([sys.executable, str(script), str(tiny_store), "2100", bounded, "1"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        results[bounded] = json.loads(run.stdout.strip().splitlines()[-1])
    ok, control = results["1"], results["0"]
    print(f"\n{ok['plan']}\npeak RSS bounded {_mib(ok['peak_rss'])} = {ok['peak_rss'] / ok['budget']:.3f} "
          f"x budget; unbounded {_mib(control['peak_rss'])} = {control['peak_rss'] / control['budget']:.3f} x")
    assert ok["tokens"] == control["tokens"] == 4
    assert ok["peak_rss"] <= PEAK_TOLERANCE * ok["budget"]
    assert control["peak_rss"] > PEAK_TOLERANCE * control["budget"], "the control run stayed in budget"


def test_budget_holds_with_four_concurrent_sequences(tiny_store, tmp_path):
    """Four 600-token prompts through mlx-lm's BatchGenerator with its default prefill
    batch and step, on a model planned for batch=4: within the budget."""
    script = tmp_path / "batch.py"
    script.write_text(textwrap.dedent(LONG_CHILD))
    run = subprocess.run([sys.executable, str(script), str(tiny_store), "600", "1", "4"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\n{r['plan']}\npeak RSS {_mib(r['peak_rss'])} = {r['peak_rss'] / r['budget']:.3f} x budget")
    assert r["tokens"] == 4 and "4 x 664 tokens" in r["plan"]
    assert r["peak_rss"] <= PEAK_TOLERANCE * r["budget"]
