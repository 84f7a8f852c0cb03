"""Measure the converter's peak memory on a synthetic Qwen3-MoE checkpoint of a chosen size.

Writes a random bf16 checkpoint in the Hugging Face per-expert layout
(``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, sharded like hub
checkpoints), runs ``d2moe convert`` on it in a fresh process and prints the
converter's peak RSS next to the checkpoint size and one layer's expert bytes.

    python scripts/measure_convert_rss.py --size-gb 1.2 --work /tmp/rss
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


def make_checkpoint(out: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int,
                    shard_bytes: int = 512 << 20) -> int:
    """Write the checkpoint; returns its size in bytes."""
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
    (out / "config.json").write_text(json.dumps(config, indent=1))
    key = mx.random.key(0)

    def rand(*shape):
        return (mx.random.normal(shape, key=mx.random.split(key)[0]) * 0.02).astype(mx.bfloat16)

    shard, shard_size, index, n, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            mx.save_safetensors(str(out / name), shard)
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

    add("model.embed_tokens.weight", rand(vocab, hidden))
    for l in range(layers):
        p = f"model.layers.{l}"
        add(f"{p}.self_attn.q_proj.weight", rand(heads * head_dim, hidden))
        add(f"{p}.self_attn.k_proj.weight", rand(kv_heads * head_dim, hidden))
        add(f"{p}.self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden))
        add(f"{p}.self_attn.o_proj.weight", rand(hidden, heads * head_dim))
        add(f"{p}.self_attn.q_norm.weight", mx.ones((head_dim,), mx.bfloat16))
        add(f"{p}.self_attn.k_norm.weight", mx.ones((head_dim,), mx.bfloat16))
        add(f"{p}.input_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        add(f"{p}.post_attention_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        add(f"{p}.mlp.gate.weight", rand(experts, hidden))
        for e in range(experts):
            add(f"{p}.mlp.experts.{e}.gate_proj.weight", rand(inter, hidden))
            add(f"{p}.mlp.experts.{e}.up_proj.weight", rand(inter, hidden))
            add(f"{p}.mlp.experts.{e}.down_proj.weight", rand(hidden, inter))
    add("model.norm.weight", mx.ones((hidden,), mx.bfloat16))
    add("lm_head.weight", rand(vocab, hidden))
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="target checkpoint size")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2moe-rss"))
    parser.add_argument("--method", default=None, help="MWQ fit method passed to d2moe convert")
    args = parser.parse_args()

    layer_expert_bytes = args.experts * 3 * args.hidden * args.inter * 2
    layers = max(2, round(args.size_gb * (1 << 30) / layer_expert_bytes))
    shutil.rmtree(args.work, ignore_errors=True)
    ckpt = args.work / "hf"
    total = make_checkpoint(ckpt, layers, args.experts, args.hidden, args.inter, vocab=8192)
    print(f"checkpoint: {total / 2**30:.2f} GiB bf16, {layers} layers x {args.experts} experts "
          f"({args.hidden}x{args.inter}), one layer's experts {layer_expert_bytes / 2**20:.1f} MiB")
    cmd = [sys.executable, "-m", "d2moe_mlx.cli", "convert", str(ckpt), "-o", str(args.work / "store")]
    if args.method:
        cmd += ["--method", args.method]
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
