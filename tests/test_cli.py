"""The `d2moe` command line, end to end in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

D2MOE = [sys.executable, "-m", "d2moe_mlx.cli"]
FAST = ["--dense-bits", "0", "--dtype", "float32", "--calib-tokens", "128", "--seq-len", "32"]


def run(*args, input=None, env=None, timeout=600):
    return subprocess.run(D2MOE + [str(a) for a in args], capture_output=True, text=True,
                          input=input, env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def store(hf_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    res = run("convert", hf_checkpoint("qwen3_moe"), "-o", out, *FAST)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "peak RSS" in res.stdout
    return out


def test_help_for_every_command():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("convert", "generate", "chat", "inspect", "trace", "demo"):
        assert cmd in res.stdout
        sub = run(cmd, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Usage:" in sub.stdout and len(sub.stdout) > 200


def test_generate_prints_text_and_stats(store):
    res = run("generate", store, "-p", "hello", "-m", "8")
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stderr and "peak memory" in res.stderr
    res0 = run("generate", store, "-p", "hello", "-m", "8", "--level", "0")
    assert res0.returncode == 0, res0.stderr
    bad = run("generate", store, "--level", "9")
    assert bad.returncode == 1 and "level 9 does not exist" in bad.stderr


def test_chat_reads_turns_until_q(store):
    res = run("chat", store, "-m", "6", "--temp", "0", input="hello\nhow are you\nq\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("generation:") == 2  # one stats line per reply


def test_chat_with_a_memory_budget_streams_and_reports(store):
    """--memory: same reply as resident, and per-reply hit rate, MB/token and peak RSS."""
    resident = run("generate", store, "-p", "hello", "-m", "8")
    too_small = run("generate", store, "-p", "hello", "-m", "8", "--memory", "50MB")
    assert too_small.returncode == 1 and "smallest budget that works is" in too_small.stderr
    need = too_small.stderr.split("smallest budget that works is ")[1].split(";")[0]
    value, unit = need.split()
    budget = f"{float(value) * 1.1:.2f}{unit[0]}B"  # above the smallest (baselines vary a little)
    res = run("generate", store, "-p", "hello", "-m", "8", "--memory", budget, "--context", "4096")
    assert res.returncode == 0, res.stderr
    assert res.stdout == resident.stdout  # exact mode: the same text
    assert "streaming experts: budget" in res.stderr and "hit rate" in res.stderr
    assert "MB read/token" in res.stderr and "peak RSS" in res.stderr
    chat = run("chat", store, "-m", "6", "--temp", "0", "--memory", budget, input="hello\nagain\nq\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("hit rate") == 2  # one stats line per reply


def test_inspect_reports_and_detects_corruption(store, tmp_path):
    res = run("inspect", store)
    assert res.returncode == 0, res.stderr
    assert "qwen3_moe" in res.stdout and "integrity: OK" in res.stdout
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    victim = copy / "experts" / "L000.c0.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    bad = run("inspect", copy)
    assert bad.returncode == 1
    assert "L000.c0.bin" in bad.stdout and "FAILED" in bad.stdout


def test_convert_errors_are_one_clear_line(tmp_path, hf_checkpoint):
    res = run("convert", tmp_path / "missing", "-o", tmp_path / "o")
    assert res.returncode == 1
    assert "Error:" in res.stderr and "Traceback" not in res.stderr
    res = run("convert", hf_checkpoint("qwen3_moe"), "-o", tmp_path / "o", "--levels", "2,2")
    assert res.returncode == 1 and "strictly increase" in res.stderr
    res = run("generate", hf_checkpoint("qwen3_moe"))
    assert res.returncode == 1 and "d2moe convert" in res.stderr


def test_trace_writes_routing(store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is routing text " * 4)
    out = tmp_path / "trace.npz"
    res = run("trace", store, text, "-o", out)
    assert res.returncode == 0, res.stderr
    data = np.load(out, allow_pickle=False)
    assert data["ids"].ndim == 3 and data["ids"].shape[2] == 2


def test_demo_end_to_end(tmp_path):
    env = {"D2MOE_CACHE": str(tmp_path)}
    res = run("demo", "-m", "12", env=env)
    assert res.returncode == 0, res.stderr
    assert "tokens/s" in res.stdout and "peak RSS" in res.stdout
    stores = list(tmp_path.glob("tiny-moe-*"))
    assert len(stores) == 1
    again = run("demo", "-m", "4", env=env)  # reuses the cached store
    assert again.returncode == 0 and "using cached store" in again.stdout
    gen = run("generate", stores[0], "-p", "The", "-m", "8")
    assert gen.returncode == 0, gen.stderr


def _one_error_line(res) -> str:
    """The CLI failed with exactly one `Error:` line on stderr and printed nothing else."""
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert res.stdout == ""
    return lines[0]


def test_convert_checks_its_input_before_the_progress_bar(tmp_path, hf_checkpoint):
    """A bad SRC or a refused OUT fails before the "converting ..." header and the bar."""
    src = hf_checkpoint("qwen3_moe")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("precious")
    cases = [((tmp_path / "missing", "-o", tmp_path / "o"), "neither an existing directory"),
             ((llama, "-o", tmp_path / "o"), "llama"),
             ((src, "-o", user), "already exists"),
             ((src, "-o", user, "--overwrite"), "keep.txt")]
    for args, match in cases:
        line = _one_error_line(run("convert", *args, *FAST))
        assert match in line and "converting" not in line
    assert [p.name for p in user.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "user"]


def test_convert_errors_name_cli_flags(tmp_path, hf_checkpoint):
    """The library names options both ways; the CLI shows only its own flags."""
    from d2moe_mlx.mwq import MWQSpec

    with pytest.raises(ValueError, match=r"planes='affine'"):
        MWQSpec.parse("2,4", planes="binary")  # the Python API keeps its spelling
    src = hf_checkpoint("qwen3_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for args, flags in [(("-o", out), ["--overwrite"]),
                        (("-o", out, "--overwrite"), ["--overwrite only replaces"]),
                        (("-o", tmp_path / "n", "--levels", "2,4", "--planes", "binary"),
                         ["--levels 2,4", "--planes affine"]),
                        (("-o", tmp_path / "n", "--levels", "3,2"), ["--levels 3,2", "strictly increase"]),
                        (("-o", tmp_path / "n", "--levels", "2,x"), ["--levels 2,x"])]:
        line = _one_error_line(run("convert", src, *args))
        for flag in flags:
            assert flag in line, line
        assert "=True" not in line and "planes=" not in line and "levels=" not in line, line


def test_inspect_output_is_aligned_and_advises_reconverting(store, tmp_path):
    """`key: value` lines share one column (integrity too), calibration reads plainly, and
    the problems of a damaged store say to re-convert, not to run inspect again."""
    import re
    import shutil

    def key_lines(stdout):
        lines = [line for line in stdout.splitlines() if not line.startswith("  - ")]
        assert lines and all(": " in line for line in lines), stdout
        return lines

    ok = run("inspect", store)
    assert ok.returncode == 0, ok.stderr
    lines = key_lines(ok.stdout)
    assert len({line.index(": ") for line in lines}) == 1, ok.stdout
    assert [line.split(": ", 1) for line in lines if "integrity" in line] == [["integrity".rjust(18), "OK"]]
    calib = [line.split(": ", 1)[1] for line in lines if line.strip().startswith("calibration:")]
    assert len(calib) == 1 and re.fullmatch(r"128 tokens from text \(\d+ available\)", calib[0]), calib

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    victim = copy / "experts" / "L001.c1.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    bad = run("inspect", copy)
    assert bad.returncode == 1
    assert len({line.index(": ") for line in key_lines(bad.stdout)}) == 1, bad.stdout
    assert "integrity".rjust(18) + ": FAILED" in bad.stdout.splitlines()
    problems = [line for line in bad.stdout.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and "L001.c1.bin" in problems[0], bad.stdout
    assert "d2moe convert" in problems[0] and "d2moe inspect" not in problems[0], problems
