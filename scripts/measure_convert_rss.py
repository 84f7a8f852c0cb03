"""Measure the converter's peak memory on a synthetic Qwen3-MoE checkpoint of a chosen size.

Writes a random checkpoint in the Hugging Face per-expert layout
(``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, sharded like hub
checkpoints), runs ``d2moe convert`` on it in a fresh process and prints the
converter's peak RSS next to the checkpoint size and one layer's expert bytes.
``--format`` picks the weights: bf16 (default); fp8 (DeepSeek-V3's layout: every
linear weight of the layers but the router F8_E4M3 with a float32 ``weight_scale_inv``
per 128x128 block); mlx4 / mlx8 (mlx-lm's quantized layout: experts stacked in
``mlp.switch_mlp``, uint32 codes with bfloat16 scales and biases, group size 64,
everything but the norms quantized). The layer count comes from --size-gb at bf16,
so every format has the same model.

    python scripts/measure_convert_rss.py --size-gb 1.2 --work /tmp/rss
    python scripts/measure_convert_rss.py --size-gb 0.6 --format fp8 --method rtn
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


FORMATS = ("bf16", "fp8", "mlx4", "mlx8")


def make_checkpoint(out: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int,
                    shard_bytes: int = 512 << 20, fmt: str = "bf16") -> int:
    """Write the checkpoint in ``fmt`` (one of FORMATS); returns its size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, head_dim = hidden // 128, max(1, hidden // 512), 128
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter * 4,
        "moe_intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_experts": experts,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False, "attention_bias": False,
    }
    bits = int(fmt[3:]) if fmt.startswith("mlx") else 0
    if fmt == "fp8":
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    if bits:
        config["quantization"] = {"group_size": 64, "bits": bits, "mode": "affine"}
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    key = mx.random.key(0)
    rng = np.random.default_rng(0)
    f8_names: set[str] = set()

    def rand(*shape):
        return (mx.random.normal(shape, key=mx.random.split(key)[0]) * 0.02).astype(mx.bfloat16)

    shard, shard_size, index, n, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            if fmt == "fp8":
                _save_torch(out / name, shard, f8_names)
            else:
                mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx" if bits else "pt"})
            index.update({k: name for k in shard})
            shard, shard_size = {}, 0

    def add(name, arr):
        nonlocal shard_size, total, key
        key = mx.random.split(key)[1]
        mx.eval(arr)
        shard[name] = arr
        shard_size += arr.nbytes
        total += arr.nbytes
        if shard_size >= shard_bytes:
            flush()

    def linear(name, out_dims, in_dims, stack=0):
        """A linear weight [out, in] (``stack`` > 0: [stack, out, in]) in the checkpoint's format."""
        shape = (stack, out_dims, in_dims) if stack else (out_dims, in_dims)
        if fmt == "fp8":
            codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0  # no NaN patterns
            add(name, mx.array(codes))
            f8_names.add(name)
            add(name + "_scale_inv", mx.array(np.full((-(-out_dims // 128), -(-in_dims // 128)), 1e-4, np.float32)))
        elif bits:
            base = name[: -len(".weight")]
            add(name, mx.array(rng.integers(0, 2**32, size=(*shape[:-1], in_dims * bits // 32), dtype=np.uint32)))
            scales = mx.array(rng.uniform(1, 2, size=(*shape[:-1], in_dims // 64)).astype(np.float32) * 0.04 / 2**bits)
            add(base + ".scales", scales.astype(mx.bfloat16))
            add(base + ".biases", (-scales * (2**bits - 1) / 2).astype(mx.bfloat16))
        else:
            add(name, rand(*shape))

    if bits:
        linear("model.embed_tokens.weight", vocab, hidden)
    else:
        add("model.embed_tokens.weight", rand(vocab, hidden))
    for l in range(layers):
        p = f"model.layers.{l}"
        linear(f"{p}.self_attn.q_proj.weight", heads * head_dim, hidden)
        linear(f"{p}.self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        linear(f"{p}.self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        linear(f"{p}.self_attn.o_proj.weight", hidden, heads * head_dim)
        add(f"{p}.self_attn.q_norm.weight", mx.ones((head_dim,), mx.bfloat16))
        add(f"{p}.self_attn.k_norm.weight", mx.ones((head_dim,), mx.bfloat16))
        add(f"{p}.input_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        add(f"{p}.post_attention_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        if bits:
            linear(f"{p}.mlp.gate.weight", experts, hidden)
            for proj, o, i in (("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)):
                linear(f"{p}.mlp.switch_mlp.{proj}.weight", o, i, stack=experts)
        else:
            add(f"{p}.mlp.gate.weight", rand(experts, hidden))
            for e in range(experts):
                linear(f"{p}.mlp.experts.{e}.gate_proj.weight", inter, hidden)
                linear(f"{p}.mlp.experts.{e}.up_proj.weight", inter, hidden)
                linear(f"{p}.mlp.experts.{e}.down_proj.weight", hidden, inter)
    add("model.norm.weight", mx.ones((hidden,), mx.bfloat16))
    if bits:
        linear("lm_head.weight", vocab, hidden)
    else:
        add("lm_head.weight", rand(vocab, hidden))
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return total


def _save_torch(path: Path, shard: dict, f8_names: set[str]) -> None:
    """Write a shard with torch's safetensors writer, so FP8 weights get the F8_E4M3 dtype."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for name, arr in shard.items():
        if arr.dtype == mx.bfloat16:
            out[name] = torch.from_numpy(np.array(arr.view(mx.uint16))).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(arr))
            out[name] = t.view(torch.float8_e4m3fn) if name in f8_names else t
    save_file(out, str(path), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="target checkpoint size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2moe-rss"))
    parser.add_argument("--method", default=None, help="MWQ fit method passed to d2moe convert")
    parser.add_argument("--calib-tokens", type=int, default=None,
                        help="calibration tokens passed to d2moe convert (default: its own, 2048)")
    parser.add_argument("--format", choices=FORMATS, default="bf16",
                        help="checkpoint weights: bf16; fp8 (DeepSeek-V3 layout, F8_E4M3 + 128x128 weight_scale_inv); "
                             "mlx4/mlx8 (mlx-lm quantized layout, group size 64); the converter detects the format")
    args = parser.parse_args()

    layer_expert_bytes = args.experts * 3 * args.hidden * args.inter * 2
    layers = max(2, round(args.size_gb * (1 << 30) / layer_expert_bytes))
    shutil.rmtree(args.work, ignore_errors=True)
    ckpt = args.work / "hf"
    total = make_checkpoint(ckpt, layers, args.experts, args.hidden, args.inter, vocab=8192, fmt=args.format)
    print(f"checkpoint: {total / 2**30:.2f} GiB {args.format}, {layers} layers x {args.experts} experts "
          f"({args.hidden}x{args.inter}), one layer's experts {layer_expert_bytes / 2**20:.1f} MiB at bf16")
    cmd = [sys.executable, "-m", "d2moe_mlx.cli", "convert", str(ckpt), "-o", str(args.work / "store")]
    if args.method:
        cmd += ["--method", args.method]
    if args.calib_tokens:
        cmd += ["--calib-tokens", str(args.calib_tokens)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr)
    peak = re.search(r"peak RSS ([0-9.]+ \w+)", res.stdout)
    print(res.stdout.strip())
    print(f"converter wall time {time.perf_counter() - t0:.0f} s; peak RSS {peak.group(1) if peak else '?'} "
          f"for a {total / 2**30:.2f} GiB checkpoint")


if __name__ == "__main__":
    main()
