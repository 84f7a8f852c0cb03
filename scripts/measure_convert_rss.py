"""Measure the converter's peak memory on a synthetic Qwen3-MoE checkpoint of a chosen size.

Writes a random checkpoint in the Hugging Face per-expert layout
(``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``, sharded like hub
checkpoints), runs ``d2moe convert`` on it in a fresh process and prints the
converter's peak RSS next to the checkpoint size and one layer's expert bytes.
``--format`` picks the weights: bf16 (default); fp8 (DeepSeek-V3's layout: every
linear weight of the layers but the router F8_E4M3 with a float32 ``weight_scale_inv``
per 128x128 block); mlx4 / mlx8 (mlx-lm's quantized layout: experts stacked in
``mlp.switch_mlp``, uint32 codes with bfloat16 scales and biases, group size 64,
everything but the norms quantized); mxfp4 (a gpt_oss checkpoint in the layout of the
openai/gpt-oss repos: ``mlp.experts.{gate_up,down}_proj_blocks`` uint8 [E, out, in/32, 16]
with e8m0 ``_scales`` [E, out, in/32], bfloat16 expert biases, router, attention sinks,
``quantization_config`` ``quant_method: mxfp4``; random codes, same expert geometry).
The layer count comes from --size-gb at bf16, so every format has the same experts.

    python scripts/measure_convert_rss.py --size-gb 1.2 --work /tmp/rss
    python scripts/measure_convert_rss.py --size-gb 0.6 --format fp8 --method rtn
    python scripts/measure_convert_rss.py --size-gb 0.6 --format mxfp4 --method rtn --calib-tokens 256
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


FORMATS = ("bf16", "fp8", "mlx4", "mlx8", "mxfp4")


def make_checkpoint(out: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int,
                    shard_bytes: int = 512 << 20, fmt: str = "bf16") -> int:
    """Write the checkpoint in ``fmt`` (one of FORMATS); returns its size in bytes."""
    if fmt == "mxfp4":
        return make_gpt_oss_mxfp4(out, layers, experts, hidden, inter, vocab, shard_bytes)
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

    def save(path, shard):
        if fmt == "fp8":
            _save_torch(path, shard, f8_names)
        else:
            mx.save_safetensors(str(path), shard, metadata={"format": "mlx" if bits else "pt"})

    shards = _Shards(out, shard_bytes, save)

    def add(name, arr):
        nonlocal key
        key = mx.random.split(key)[1]
        shards.add(name, arr)

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
    return shards.close()


def make_gpt_oss_mxfp4(out: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int,
                       shard_bytes: int = 512 << 20) -> int:
    """Write a gpt_oss checkpoint as the openai/gpt-oss repos store it (experts in MXFP4,
    everything else bfloat16) with random codes; returns its size in bytes.

    Per layer: ``mlp.experts.gate_up_proj_blocks`` [E, 2*inter, hidden/32, 16] and
    ``down_proj_blocks`` [E, hidden, inter/32, 16] uint8 (two e2m1 codes a byte), their
    ``_scales`` (e8m0, one per 32 values, around 2^-8 so weights are ~0.01) and
    ``_bias``; ``mlp.router`` weight and bias; attention with biases and ``sinks``."""
    out.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, head_dim = hidden // 64, max(1, hidden // 256), 64
    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "num_local_experts": experts, "num_experts_per_tok": 4,
        "experts_per_token": 4, "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu",
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "sliding_window": 128, "initial_context_length": 4096, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 150000,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "router_aux_loss_coef": 0.9, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "quantization_config": {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(0)
    shards = _Shards(out, shard_bytes, lambda path, shard: mx.save_safetensors(str(path), shard, {"format": "pt"}))

    def rand(*shape):
        return mx.array(rng.standard_normal(shape, np.float32) * 0.02).astype(mx.bfloat16)

    def mxfp4(name, out_dims, in_dims):
        shards.add(name + "_blocks", mx.array(rng.integers(0, 256, (experts, out_dims, in_dims // 32, 16), np.uint8)))
        shards.add(name + "_scales", mx.array(rng.integers(119, 123, (experts, out_dims, in_dims // 32), np.uint8)))
        shards.add(name + "_bias", rand(experts, out_dims))

    shards.add("model.embed_tokens.weight", rand(vocab, hidden))
    for l in range(layers):
        p = f"model.layers.{l}"
        for proj, o, i in (("q_proj", heads * head_dim, hidden), ("k_proj", kv_heads * head_dim, hidden),
                           ("v_proj", kv_heads * head_dim, hidden), ("o_proj", hidden, heads * head_dim)):
            shards.add(f"{p}.self_attn.{proj}.weight", rand(o, i))
            shards.add(f"{p}.self_attn.{proj}.bias", rand(o))
        shards.add(f"{p}.self_attn.sinks", rand(heads))
        shards.add(f"{p}.input_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        shards.add(f"{p}.post_attention_layernorm.weight", mx.ones((hidden,), mx.bfloat16))
        shards.add(f"{p}.mlp.router.weight", rand(experts, hidden))
        shards.add(f"{p}.mlp.router.bias", rand(experts))
        mxfp4(f"{p}.mlp.experts.gate_up_proj", 2 * inter, hidden)
        mxfp4(f"{p}.mlp.experts.down_proj", hidden, inter)
    shards.add("model.norm.weight", mx.ones((hidden,), mx.bfloat16))
    shards.add("lm_head.weight", rand(vocab, hidden))
    return shards.close()


class _Shards:
    """Tensors written to ``model-NNNNN.safetensors`` shards of about ``shard_bytes`` by
    ``save(path, shard)``, with the hub's ``model.safetensors.index.json``."""

    def __init__(self, out: Path, shard_bytes: int, save):
        self.out, self.shard_bytes, self.save = out, shard_bytes, save
        self.shard: dict[str, mx.array] = {}
        self.index: dict[str, str] = {}
        self.size = self.total = self.n = 0

    def add(self, name: str, arr: mx.array) -> None:
        mx.eval(arr)
        self.shard[name] = arr
        self.size += arr.nbytes
        self.total += arr.nbytes
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.shard:
            self.n += 1
            name = f"model-{self.n:05d}.safetensors"
            self.save(self.out / name, self.shard)
            self.index.update({k: name for k in self.shard})
            self.shard, self.size = {}, 0

    def close(self) -> int:
        """Write the last shard and the index; returns the bytes written."""
        self.flush()
        (self.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": self.index}))
        return self.total


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
                             "mlx4/mlx8 (mlx-lm quantized layout, group size 64); mxfp4 (gpt_oss in the "
                             "openai/gpt-oss layout); the converter detects the format")
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
