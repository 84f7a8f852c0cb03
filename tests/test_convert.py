"""The converter: streaming, atomicity, refusals, hub cache, calibration statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from make_test_checkpoints import make_checkpoint

from d2moe_mlx import mwq
from d2moe_mlx.convert.convert import convert
from d2moe_mlx.convert.source import SourceError
from d2moe_mlx.store.format import StoreError
from d2moe_mlx.store.reader import Store
from d2moe_mlx.store.writer import StoreWriter

FAST = dict(dense_bits=0, dtype="float32", calib_tokens=128, seq_len=32)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3") / "hf")


def _run_python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], **kwargs)


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", "float32"), ("qwen3_moe", "bfloat16"), ("gpt_oss", "float32")])
def test_numpy_expert_forward_matches_mlx_lm_switch(family, dtype, hf_checkpoint):
    """Calibration computes experts with numpy; it must equal mlx-lm's SwitchGLU (gpt_oss: biases, clamped SwiGLU)."""
    import mlx.core as mx

    from d2moe_mlx.convert import calibrate
    from d2moe_mlx.convert.hf_config import load_mlx_reference
    from d2moe_mlx.moe import switch_modules

    model, _ = load_mlx_reference(hf_checkpoint(family))
    model.set_dtype(getattr(mx, dtype))  # bfloat16 weights reach the quantizer as raw bits
    model.set_dtype(mx.float32)  # exact: the reference computes on the same values
    _, switch = switch_modules(model)[0]
    x = mx.random.normal((2, 40, switch.gate_proj.weight.shape[-1]), key=mx.random.key(1)) * 2
    num_experts = switch.gate_proj.weight.shape[0]
    first = mx.random.randint(0, num_experts, (2, 40, 1), key=mx.random.key(2))
    step = mx.random.randint(1, num_experts, (2, 40, 1), key=mx.random.key(3))
    idx = mx.concatenate([first, (first + step) % num_experts], axis=-1)  # two distinct experts per token
    want = switch(x, idx)
    mx.eval(want)
    switch.set_dtype(getattr(mx, dtype))
    experts = calibrate.take_experts(switch)
    got = calibrate.experts_forward(experts, x, idx)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)
    for e in range(experts.num_experts):
        routed = experts.inputs["gate_proj"][e]
        assert len(routed) == int((np.array(idx) == e).sum())


def test_numpy_expert_forward_never_runs_the_activation_on_no_rows(hf_checkpoint):
    """An expert no calibration token chose gets an empty input and output, and the
    activation (an MLX op) is never called on zero rows: MLX's CUDA backend aborts the
    process (SIGFPE) on that, seen converting on the H200."""
    import mlx.core as mx

    from d2moe_mlx.convert import calibrate
    from d2moe_mlx.convert.hf_config import load_mlx_reference
    from d2moe_mlx.moe import switch_modules

    model, _ = load_mlx_reference(hf_checkpoint("qwen3_moe"))
    model.set_dtype(mx.float32)
    _, switch = switch_modules(model)[0]
    x = mx.random.normal((1, 6, switch.gate_proj.weight.shape[-1]), key=mx.random.key(4))
    idx = mx.array([[[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0]]], dtype=mx.uint32)  # 3..7 unused
    want = switch(x, idx)
    experts = calibrate.take_experts(switch)
    real = experts.activation

    def activation(*args):
        assert all(a.shape[0] for a in args), "the activation ran on zero rows"
        return real(*args)

    experts.activation = activation
    got = calibrate.experts_forward(experts, x, idx)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)
    assert [len(experts.inputs["down_proj"][e]) for e in range(8)] == [4, 5, 3, 0, 0, 0, 0, 0]


def test_calibration_statistics_and_manifest(qwen3, tmp_path):
    report = convert(qwen3, tmp_path / "s", **FAST)
    with Store.open(report.path) as store:
        stats = store.calib_stats()
        config = json.loads((report.path / "config.json").read_text())
        k = config["num_experts_per_tok"]
        tokens = store.manifest["calibration"]["tokens"]
        for layer in store.moe_layers:
            counts = stats[f"layer{layer}.counts"]
            assert counts.shape == (store.num_experts,)
            assert counts.sum() == tokens * k  # every token picks k distinct experts
            mean = stats[f"layer{layer}.mean_score"]
            assert np.isclose(mean.sum(), 1.0, atol=1e-4)  # softmax router probabilities
        assert store.verify() == []
    assert (report.path / "hf_config.json").read_bytes() == (qwen3 / "config.json").read_bytes()


def test_interrupted_conversion_leaves_nothing_loadable(qwen3, tmp_path):
    out = tmp_path / "store"
    marker = tmp_path / "layer-done"
    proc = _run_python(
        f"""
        import time
        from pathlib import Path
        from d2moe_mlx.convert.convert import convert
        def progress(done, total):
            Path({str(marker)!r}).write_text(str(done))
            time.sleep(60)
        convert({str(qwen3)!r}, {str(out)!r}, progress=progress, dense_bits=0, dtype="float32",
                calib_tokens=128, seq_len=32)
        """
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "converter exited early"
            assert time.time() < deadline, "converter never reached its first layer"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    with pytest.raises(StoreError):
        Store.open(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("store.d2moe-tmp-")]
    assert leftovers, "the killed run should have left its temporary directory"
    report = convert(qwen3, out, **FAST)  # the next run succeeds and cleans up
    Store.open(report.path).close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("store.d2moe-tmp-")]


def test_existing_output_needs_overwrite(qwen3, tmp_path):
    convert(qwen3, tmp_path / "s", **FAST)
    with pytest.raises((FileExistsError, StoreError, ValueError), match="overwrite"):
        convert(qwen3, tmp_path / "s", **FAST)
    convert(qwen3, tmp_path / "s", overwrite=True, **FAST)


def test_overwrite_never_deletes_what_is_not_a_store(qwen3, tmp_path, monkeypatch):
    """--overwrite over a directory of user files is refused before any conversion work."""
    from d2moe_mlx.convert import calibrate

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")

    def started(*args, **kwargs):
        raise AssertionError("conversion work started before the output was checked")

    monkeypatch.setattr(calibrate, "calibration_tokens", started)
    with pytest.raises(FileExistsError, match="keep.txt") as ei:
        convert(qwen3, out, overwrite=True, **FAST)
    assert str(out) in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_prepare_checks_before_any_work_and_writes_nothing(qwen3, tmp_path, monkeypatch):
    """prepare() refuses bad options, sources and outputs without converting or writing."""
    from d2moe_mlx.convert import calibrate
    from d2moe_mlx.convert.convert import prepare

    def started(*args, **kwargs):
        raise AssertionError("conversion work started in prepare()")

    monkeypatch.setattr(calibrate, "calibration_tokens", started)
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="dense_group_size"):
        prepare(qwen3, out, **{**FAST, "dense_group_size": 48})
    spec = mwq.MWQSpec(2, (2,), 128)
    with pytest.raises(ValueError, match="not a multiple of the MWQ group size 128"):
        prepare(qwen3, out, spec=spec, **FAST)
    with pytest.raises(SourceError, match="neither an existing directory"):
        prepare(tmp_path / "missing", out, **FAST)
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare(qwen3, out, **FAST)
    out.rmdir()
    job = prepare(qwen3, out, **FAST)
    assert job.num_layers == json.loads((qwen3 / "config.json").read_text())["num_hidden_layers"]
    assert list(tmp_path.iterdir()) == []  # nothing written yet
    monkeypatch.undo()
    report = job.run()
    with Store.open(report.path) as store:
        assert store.manifest["dense"] == {"bits": 0, "group_size": 64, "dtype": "float32"}
    with pytest.raises(RuntimeError, match="already run"):
        job.run()


def test_runtime_loads_every_dense_dtype_the_reader_accepts():
    from d2moe_mlx.model import DTYPES
    from d2moe_mlx.store.format import DENSE_DTYPES

    assert sorted(DTYPES) == sorted(DENSE_DTYPES)


def test_unsupported_family_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="llama"):
        convert(ckpt, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


def test_remote_code_is_refused(qwen3, tmp_path):
    ckpt = tmp_path / "remote"
    ckpt.mkdir()
    config = json.loads((qwen3 / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="(?i)remote code|auto_map"):
        convert(ckpt, tmp_path / "out", **FAST)


def test_pickle_checkpoint_is_refused(qwen3, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((qwen3 / "config.json").read_text())
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match="pickle"):
        convert(ckpt, tmp_path / "out", **FAST)


def test_missing_source_and_bad_options(qwen3, tmp_path):
    with pytest.raises(SourceError, match="neither an existing directory"):
        convert(tmp_path / "nope" / "x", tmp_path / "out", **FAST)
    with pytest.raises(ValueError, match="dense-bits"):
        convert(qwen3, tmp_path / "out", **{**FAST, "dense_bits": 7})
    with pytest.raises(ValueError, match="strictly increase"):
        mwq.MWQSpec.parse("3,2")


def test_hub_id_from_offline_cache(qwen3, tmp_path):
    """`d2moe convert org/name` resolves through the local HF cache with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--d2moe-test--tiny-qwen3"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in qwen3.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "d2moe_mlx.cli", "convert", "d2moe-test/tiny-qwen3", "-o", str(out),
           "--dense-bits", "0", "--dtype", "float32", "--calib-tokens", "128", "--seq-len", "32"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    Store.open(out).close()
    missing = subprocess.run(cmd[:4] + ["d2moe-test/not-cached"] + cmd[5:7] + ["-o", str(tmp_path / "x")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert "not in the local Hugging Face cache" in missing.stderr


_PEAK_SCRIPT = """
import sys
from d2moe_mlx.convert.convert import convert
report = convert(sys.argv[1], sys.argv[2], dense_bits=0, dtype="float32", calib_tokens=128, seq_len=32,
                 method="rtn")  # memory does not depend on the fit; rtn keeps the test fast
print(report.peak_rss)
"""


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    """Streaming: 6 layers of 24 MiB experts cost no more peak memory than 2 layers."""
    big = dict(hidden_size=256, moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    peaks = {}
    for layers in (2, 6):
        ckpt = make_checkpoint("qwen3_moe", tmp_path / f"hf{layers}", num_hidden_layers=layers, **big)
        res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(ckpt), str(tmp_path / f"s{layers}")],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        peaks[layers] = int(res.stdout.strip().splitlines()[-1])
    layer_bytes = 32 * 3 * 256 * 256 * 4
    growth = peaks[6] - peaks[2]
    # Holding all layers would add 4 more layers' experts (and their copies);
    # streaming adds at most noise of the order of one layer.
    assert growth < 1.5 * layer_bytes, f"peak RSS grew by {growth / 2**20:.1f} MiB from 2 to 6 layers"


def test_mwq_components_round_trip_through_store_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    spec = mwq.MWQSpec(2, (1, 2), 64)
    weights = rng.standard_t(4, size=(3, 128, 256)).astype(np.float32)
    comps = [mwq.quantize_mwq(w, spec) for w in weights]
    with StoreWriter(tmp_path / "s") as writer:
        for c in range(spec.num_levels):
            writer.write_expert_file(0, c, [{f"p.{k}": v for k, v in mwq.pack_component(e[c]).items()} for e in comps])
        writer.write_json("config.json", {"model_type": "test"})
        path = writer.finalize({"num_experts": 3})
    with Store.open(path) as store:
        for e, expected in enumerate(comps):
            for c, comp in enumerate(expected):
                block = store.read_block(0, c, e)
                packed = {k.split(".", 1)[1]: v for k, v in block.items()}
                back = mwq.unpack_component(packed, comp.bits, comp.codes.shape)
                np.testing.assert_array_equal(back.codes, comp.codes)
                np.testing.assert_array_equal(back.scales, comp.scales)
                if comp.biases is None:
                    assert back.biases is None
                else:
                    np.testing.assert_array_equal(back.biases, comp.biases)
            level = spec.num_levels - 1
            np.testing.assert_array_equal(
                mwq.reconstruct([mwq.unpack_component({k.split(".", 1)[1]: v for k, v in store.read_block(0, c, e).items()},
                                                      expected[c].bits, expected[c].codes.shape)
                                 for c in range(spec.num_levels)], 64, level),
                mwq.reconstruct(expected, 64, level),
            )


def test_corrupted_store_never_loads_garbage(qwen3, tmp_path):
    from d2moe_mlx import load_model

    report = convert(qwen3, tmp_path / "s", **FAST)
    victim = report.path / "experts" / "L001.c1.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="L001.c1.bin"):
        load_model(report.path, dtype="float32")
    victim.unlink()
    with pytest.raises(StoreError, match="L001.c1.bin"):
        load_model(report.path, dtype="float32")


@pytest.mark.parametrize("layout", [{"fused_experts": True}, {"max_shard_size": "200KB"}])
def test_checkpoint_layouts_convert_to_identical_stores(layout, hf_checkpoint, tmp_path):
    """transformers-5 fused experts and multi-shard checkpoints give the same store as the hub layout."""
    family = "mixtral" if "max_shard_size" in layout else "qwen3_moe"
    reference = convert(hf_checkpoint(family), tmp_path / "hub", **FAST)
    other = convert(hf_checkpoint(family, **layout), tmp_path / "other", **FAST)
    if "max_shard_size" in layout:
        assert len(list(hf_checkpoint(family, **layout).glob("*.safetensors"))) > 1
    with Store.open(reference.path) as a, Store.open(other.path) as b:
        assert a.manifest["experts"] == b.manifest["experts"]  # every block's layout and checksum
        assert a.manifest["files"]["config.json"] == b.manifest["files"]["config.json"]


def test_gptq_conversion_uses_the_full_hessian(qwen3, tmp_path):
    report = convert(qwen3, tmp_path / "s", method="gptq", **FAST)
    with Store.open(report.path) as store:
        assert store.verify() == []


def test_calibration_note_reads_plainly(qwen3, tmp_path):
    """Where the calibration tokens came from, as `d2moe inspect` and `d2moe convert` print it."""
    from d2moe_mlx.convert import calibrate

    vocab = json.loads((qwen3 / "config.json").read_text())["vocab_size"]
    text = "hello world, some calibration text. " * 40
    tokens, note = calibrate.calibration_tokens(qwen3, text, 64, 16, vocab)
    n = int(note.split("(")[1].split()[0])
    assert n >= 64 and note == f"text ({n} available)"
    assert calibrate.describe_calibration(int(tokens.size), note) == f"64 tokens from text ({n} available)"
    tokens, note = calibrate.calibration_tokens(qwen3, "hi", 64, 16, vocab)
    assert tokens.size == 64 and note.startswith("text (") and "random token ids" in note
    assert note.count("(") == note.count(")") == 2 and "((" not in note  # no nesting
    bare = tmp_path / "bare"
    bare.mkdir()
    tokens, note = calibrate.calibration_tokens(bare, None, 64, 16, vocab)
    assert calibrate.describe_calibration(int(tokens.size), note) == \
        "64 tokens from random token ids (the checkpoint has no tokenizer)"
