"""Every script in scripts/ starts and prints its usage with --help (a new script is
covered by being there): an import that no longer exists fails here, not in a benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_scripts_found():
    assert len(list(SCRIPTS.glob("*.py"))) >= 10


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.py")), ids=lambda p: p.name)
def test_help(script):
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         cwd=SCRIPTS.parent, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:") and script.name in res.stdout, res.stdout
    assert "-h, --help" in res.stdout



@pytest.fixture(scope="module")
def store(hf_checkpoint, tmp_path_factory):
    from d2moe_mlx.convert.convert import convert

    out = tmp_path_factory.mktemp("scripts") / "store"
    return convert(hf_checkpoint("qwen3_moe"), out, method="rtn", dense_bits=0, dtype="float32",
                   calib_tokens=64, seq_len=32).path


@pytest.mark.parametrize("slots", [3, 5, 8])  # top-2: a slot fewer still plans
def test_budget_for_slots_is_the_inverse_of_plan_budget(store, slots):
    from bench_streaming import budget_for_slots

    from d2moe_mlx import mwq
    from d2moe_mlx.budget import plan_budget
    from d2moe_mlx.layout import make_layout
    from d2moe_mlx.store.reader import Store

    baseline = 100 << 20
    with Store.open(store) as s:
        lay = make_layout("planes", mwq.MWQSpec.from_dict(s.manifest["mwq"]))  # an rtn store
        budget = budget_for_slots(slots, s, 1, 4, baseline, context=64, prefill_step=16)
        plan = plan_budget(budget, s, s.config, lay, 1, 4, baseline, context=64, prefill_step=16)
        assert set(plan.slots.values()) == {slots}
        # the slack (half a slot) is less than a slot: one slot's bytes less gives a slot fewer
        one = plan.layers * sum(plan.slot_bytes.values())
        fewer = plan_budget(budget - one, s, s.config, lay, 1, 4, baseline, context=64, prefill_step=16)
        assert set(fewer.slots.values()) == {slots - 1}


def test_bench_streaming_worker_runs(store):
    """bench_streaming's worker, as the benchmark runs it (a subprocess per configuration):
    a streaming configuration loads with its budget, decodes, and reports its cache."""
    import json

    cfg = dict(store=str(store), level=1, device="cpu", decode=3, prompt=[5, 9, 33, 70, 2, 8],
               trace=None, regime="own", context=64, prefill_step=16, policy="lru",
               prefetch=False, mode="stream", fraction=0.5, kind="stream", name="stream",
               temp="warm")
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench_streaming.py"), "--worker",
                          json.dumps(cfg)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == cfg["decode"] + 1 and out["budget"] > 0
    assert 2 <= out["slots"] <= 4, out  # 4 asked; the baseline measured again may take one
