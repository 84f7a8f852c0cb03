"""The `d2moe` command line, end to end in subprocesses."""

from __future__ import annotations

import importlib.util
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
    for cmd in ("convert", "generate", "chat", "inspect", "trace", "demo", "replay"):
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
    budget = f"{float(value) * 1.1:.2f}{unit}"  # above the smallest (baselines vary a little)
    res = run("generate", store, "-p", "hello", "-m", "8", "--memory", budget, "--context", "4096")
    assert res.returncode == 0, res.stderr
    assert res.stdout == resident.stdout  # exact mode: the same text
    assert "streaming experts: budget" in res.stderr and "hit rate" in res.stderr
    assert "MB read/token" in res.stderr and "peak RSS" in res.stderr
    chat = run("chat", store, "-m", "6", "--temp", "0", "--memory", budget, input="hello\nagain\nq\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("hit rate") == 2  # one stats line per reply
    # The KV context the budget reserves: a reply stops where it is full, and says so.
    full = run("generate", store, "-p", "hello", "-m", "200", "--memory", budget, "--context", "64")
    assert full.returncode == 0, full.stderr
    assert "64-token context the memory budget reserves is full" in full.stderr
    assert "generation: 59 tokens" in full.stderr  # 64 - the 5-token prompt
    long = run("generate", store, "-p", "x" * 80, "--memory", budget, "--context", "64")
    assert long.returncode == 1 and long.stderr.count("Error:") == 1 and "Traceback" not in long.stderr
    assert "64-token context" in long.stderr and "--context" in long.stderr


def test_memory_sizes_need_a_unit_and_are_echoed(store):
    """--memory: MB is 10^6 bytes, a bare number is refused with a hint; the CLI says what it read."""
    bare = run("generate", store, "--memory", "6")
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "'--memory'" in bare.stderr and "add a unit: 6GB or 6GiB" in bare.stderr
    small = run("generate", store, "-m", "1", "--memory", "1MB")
    assert small.returncode == 1 and "Traceback" not in small.stderr
    assert "memory budget: 1.00 MB (976.56 KiB)" in small.stderr
    assert "a memory budget of 976.56 KiB is too small" in small.stderr


@pytest.fixture(scope="module")
def damaged_store(store, tmp_path_factory):
    """A copy of ``store`` with one byte flipped in every expert block of the last MoE
    layer's last component: whatever the prompt routes to there fails its checksum."""
    from d2moe_mlx.store.reader import Store

    copy = tmp_path_factory.mktemp("damaged") / "store"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    with Store.open(copy) as s:
        layer = s.moe_layers[-1]
        comp = s.num_components(layer) - 1
        file = s.expert_file(layer, comp)
        stride, block = s.block_stride(layer, comp), s.block_bytes(layer, comp)
        experts = s.num_experts
    data = bytearray(file.read_bytes())
    for e in range(experts):
        data[e * stride + block // 3] ^= 0x5A
    file.write_bytes(bytes(data))
    return copy, file


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_damaged_expert_while_streaming_is_one_error_line(damaged_store, command):
    """With --memory experts are read during generation (inside mlx-lm's loop): a checksum
    failure there ends the command with one Error line naming the file, no traceback."""
    path, file = damaged_store
    args = ["-p", "hello"] if command == "generate" else []
    res = run(command, path, *args, "-m", "4", "--memory", "2GB", input="hello\nq\n")
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.stderr
    assert "checksum mismatch" in errors[0] and file.name in errors[0], res.stderr


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


def test_readme_states_the_convert_defaults():
    """README's `d2moe convert` paragraph names the levels and planes the code defaults to."""
    import re
    from pathlib import Path

    from d2moe_mlx.cli import convert
    from d2moe_mlx.mwq import DEFAULT_SPEC

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    levels = re.search(r"`--levels` \(total bits\s+per level; default `([0-9,]+)`", readme)
    assert levels, "README no longer states the default --levels"
    assert levels.group(1) == ",".join(str(DEFAULT_SPEC.level_bits(i))
                                       for i in range(DEFAULT_SPEC.num_levels))
    planes = re.search(r"`--planes` \(`(\w+)`, the default", readme)
    default = next(p.default for p in convert.params if p.name == "planes")
    assert planes and planes.group(1) == default


DEMO_PROMPT = "The Python standard library"  # the demo's default prompt


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``d2moe demo -m 16`` once (converts the bundled model): (store, stdout)."""
    cache = tmp_path_factory.mktemp("demo-cache")
    res = run("demo", "-m", "16", env={"D2MOE_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    (store,) = cache.glob("tiny-moe-*")
    return store, res.stdout


def _greedy(store, prompt, max_tokens, detokenizer_class=None):
    """(tokenizer, prompt ids, responses) of mlx-lm's own stream_generate on the store's model."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from d2moe_mlx import load

    model, tokenizer = load(store)
    if detokenizer_class is not None:
        tokenizer = TokenizerWrapper(tokenizer._tokenizer, detokenizer_class,
                                     eos_token_ids=tokenizer.eos_token_ids)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    return tokenizer, tokenizer.encode(prompt), responses


def _decoded(tokenizer, ids, responses):
    """tokenizer.decode(prompt ids + generated ids): what the printed text must read."""
    generated = [r.token for r in responses if r.finish_reason != "stop"]  # a final stop is EOS
    return tokenizer.decode(ids + generated)


@pytest.mark.parametrize("detokenizer", ["bundled", "naive"])
def test_text_after_prompt_equals_decoding_prompt_and_reply(demo_run, detokenizer):
    """Printed after the prompt, the streamed text reads as decode(prompt + generated): the
    first token keeps its leading space (mlx-lm's detokenizers drop it: 'librarynow')."""
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

    from d2moe_mlx.generation import text_after_prompt

    store, _ = demo_run
    cls = NaiveStreamingDetokenizer if detokenizer == "naive" else None
    tokenizer, ids, responses = _greedy(store, DEMO_PROMPT, 16, cls)
    reference = _decoded(tokenizer, ids, responses)
    assert reference.startswith(DEMO_PROMPT + " ")  # the case in point: a leading space
    printed = "".join(text for text, _ in text_after_prompt(tokenizer, ids, responses))
    assert DEMO_PROMPT + printed == reference


def test_demo_and_generate_print_the_text_as_decoded(demo_run):
    store, demo_out = demo_run
    reference = _decoded(*_greedy(store, DEMO_PROMPT, 16))
    assert f"\n{reference}\n" in demo_out
    gen = run("generate", store, "-p", DEMO_PROMPT, "-m", "16")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == reference + "\n"


class _Session:
    """A `d2moe chat` subprocess whose stdout and stderr are read as they come."""

    def __init__(self, *args):
        import threading

        self.proc = subprocess.Popen(D2MOE + ["chat", *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", bufsize=0)
        self.out, self.err = [], []
        for stream, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, buf), daemon=True).start()

    @staticmethod
    def _pump(stream, buf):
        while c := stream.read(1):
            buf.append(c)

    @property
    def stdout(self):
        return "".join(self.out)

    @property
    def stderr(self):
        return "".join(self.err)

    def wait_for(self, condition, timeout=120):
        import time

        end = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None or condition(), f"exited: {self.stderr}"
            assert time.monotonic() < end, f"timed out; stdout {self.stdout[-300:]!r}, stderr {self.stderr}"
            time.sleep(0.02)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_chat_ctrl_c_stops_a_reply_and_returns_to_the_prompt(store):
    import signal

    chat = _Session(store, "-m", "100000", "--temp", "0")
    try:
        chat.wait_for(lambda: chat.stdout.endswith(">> "))
        assert "qwen3_moe" in chat.stderr and "Ctrl-C stops a reply" in chat.stderr  # the banner
        chat.send("hello")
        chat.wait_for(lambda: len(chat.stdout) > 100)  # the reply is streaming (100000 tokens asked)
        chat.proc.send_signal(signal.SIGINT)
        chat.wait_for(lambda: "reply stopped" in chat.stderr and chat.stdout.endswith("\n>> "))
        assert chat.proc.poll() is None
        chat.send("q")
        assert chat.proc.wait(60) == 0, chat.stderr
        assert "Traceback" not in chat.stderr and "generation:" in chat.stderr
    finally:
        chat.proc.kill()


def test_chat_ctrl_c_or_ctrl_d_at_the_prompt_exits_cleanly(store):
    import signal

    chat = _Session(store)
    try:
        chat.wait_for(lambda: chat.stdout.endswith(">> "))
        chat.proc.send_signal(signal.SIGINT)
        assert chat.proc.wait(60) == 0, chat.stderr
        assert "Traceback" not in chat.stderr and "Aborted" not in chat.stderr
    finally:
        chat.proc.kill()
    eof = run("chat", store, input="")
    assert eof.returncode == 0 and "Traceback" not in eof.stderr


def test_generation_speed_only_from_two_tokens(store):
    """mlx-lm times generation from the first token: for one token no speed is printed."""
    import re

    one = run("generate", store, "-p", "hello", "-m", "1")
    assert one.returncode == 0, one.stderr
    assert "generation: 1 tokens, speed n/a" in one.stderr
    assert not re.search(r"generation: 1 tokens, [0-9.]+ tokens/s", one.stderr)
    two = run("generate", store, "-p", "hello", "-m", "2")
    assert re.search(r"generation: 2 tokens, [0-9.]+ tokens/s", two.stderr), two.stderr


def test_every_option_has_help():
    import click

    from d2moe_mlx.cli import main

    ctx = click.Context(main)
    missing = [f"{name} {'/'.join(p.opts)}"
               for name, command in [("d2moe", main), *sorted(main.commands.items())]
               for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help: {missing}"
    assert len(main.commands) >= 6


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed: nothing would import it anyway")
def test_cli_keeps_torch_out(store):
    """transformers 5 (via mlx-lm's tokenizer code) imports torch whenever it is installed;
    the CLI marks it absent first. transformers itself must still have been imported."""
    code = ("import sys; from d2moe_mlx.cli import main; "
            f"main(['generate', {str(store)!r}, '-p', 'hello', '-m', '2'], standalone_mode=False); "
            "print('torch', sys.modules.get('torch'), 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "torch None True", res.stdout


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
