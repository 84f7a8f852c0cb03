"""`d2moe trace` on a Hugging Face checkpoint stored in bfloat16 (the usual hub dtype):
MLX's CPU backend runs expert matmuls in float32 only, so the reference model is
loaded in float32 there; the recorded ids equal a trace of the same model in float32."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np

from d2moe_mlx.trace import load_trace


def test_trace_of_a_bf16_hf_checkpoint(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    bf16 = tmp_path / "bf16"
    shutil.copytree(src, bf16)
    for f in bf16.glob("*.safetensors"):
        weights = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                            metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    outs = {}
    for name, ckpt in (("bf16", bf16), ("f32", src)):
        out = tmp_path / f"{name}.npz"
        res = subprocess.run([sys.executable, "-m", "d2moe_mlx.cli", "trace", str(ckpt), str(text),
                              "-o", str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        outs[name] = load_trace(out)
    assert outs["bf16"]["ids"].shape == outs["f32"]["ids"].shape
    # bf16 weights route (almost) like the float32 originals
    agree = np.mean(np.sort(outs["bf16"]["ids"], -1) == np.sort(outs["f32"]["ids"], -1))
    assert agree > 0.9, agree
