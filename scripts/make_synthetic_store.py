"""Build a synthetic d2moe store: a real MoE geometry with random weights.

For streaming benchmarks: no checkpoint, no calibration, no MWQ fitting. The
default geometry is Qwen3-30B-A3B's (qwen3_moe, hidden 2048, 128 experts of
768, top-8, 32 query / 4 KV heads of 128) with fewer layers and the bundled
tiny-moe tokenizer (vocab 6144). Dense weights are mlx-lm's random init,
quantized with the converter's own rules; expert codes are random packed words
(any uint32 word is a valid code stream) with scales/biases chosen so each
component is zero-mean and the dequantized base has std ~0.02, each plane
2^bits smaller than the levels below, so a forward pass stays finite. The scales
are nested as a ``--method nested`` conversion's are (component c's scale is the
top level's step times 2^(bits below c)), so the runtime's levels layout runs it.

    python scripts/make_synthetic_store.py /tmp/synth --layers 6 --spec 2,2,4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from d2moe_mlx.convert.convert import DENSE_BITS, _dense_params, _quantize_dense
from d2moe_mlx.convert.hf_config import build_model, load_config
from d2moe_mlx.convert.source import ORIGINAL_CONFIG, TOKENIZER_FILES

from d2moe_mlx import __version__, mwq
from d2moe_mlx.demo import bundled_model
from d2moe_mlx.memory import format_bytes
from d2moe_mlx.moe import decoder_layers, layer_of, projection_names, switch_modules
from d2moe_mlx.progress import progress_bar
from d2moe_mlx.store.writer import StoreWriter

BASE_STD = 0.02  # std of the dequantized base weights (a typical trained expert's)
DENSE_GROUP_SIZE = 64
DENSE_DTYPE = "bfloat16"  # Qwen3-30B-A3B's torch_dtype

Progress = Callable[[int, int], object]


def synthetic_hf_config(layers: int, hidden: int, moe_intermediate: int, experts: int, top_k: int) -> dict:
    """Qwen3-30B-A3B's config.json with the given geometry and the tiny-moe vocab/token ids."""
    cfg = load_config(bundled_model())  # vocab_size, bos/eos/pad ids matching its tokenizer
    cfg.update({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "num_hidden_layers": layers, "hidden_size": hidden, "moe_intermediate_size": moe_intermediate,
        "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
        "head_dim": 128, "num_attention_heads": 32, "num_key_value_heads": 4,
        "intermediate_size": 6144, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_window_layers": layers, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "rope_scaling": None, "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
        "dtype": DENSE_DTYPE, "torch_dtype": DENSE_DTYPE,
    })
    return cfg


def parse_spec(text: str, group_size: int = 64) -> mwq.MWQSpec:
    """``"2,2,4"`` (component bits: base, then each plane) -> MWQSpec(2, (2, 4), group_size)."""
    try:
        bits = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"bad --spec {text!r}: give component bits like 2,2,4") from None
    if not bits:
        raise ValueError("--spec is empty: give component bits like 2,2,4")
    return mwq.MWQSpec(bits[0], tuple(bits[1:]), group_size)


def component_scale(spec: mwq.MWQSpec, c: int) -> float:
    """Scale giving component ``c`` of uniform random codes a std of BASE_STD / 2^(bits below c)."""
    std = BASE_STD / 2 ** sum(spec.component_bits(i) for i in range(c))
    bits = spec.component_bits(c)
    return std if bits == 1 else std / math.sqrt((4**bits - 1) / 12)  # std of uniform codes 0..2^b-1


def expert_blocks(spec: mwq.MWQSpec, component: int, shapes: dict[str, tuple[int, int]],
                  seed: int, layer: int, experts: int, tick: Callable[[], None]) -> Iterator[dict]:
    """One component's blocks, expert by expert, in the converter's tensor names/dtypes/shapes.

    Each group's step ``st`` (the top level's scale) is drawn from a generator of its
    own, the same for every component of an expert; component c's affine scale is
    ``st * 2^(bits of the components after c)`` (a binary plane's value scale half that)."""
    codes = np.random.default_rng([seed, layer, component])
    steps = np.random.default_rng([seed, layer, 1000])
    bits = spec.component_bits(component)
    shift = sum(spec.component_bits(c) for c in range(component + 1, spec.num_levels))
    top = component_scale(spec, spec.num_levels - 1)
    gs = spec.group_size
    for _ in range(experts):
        block = {}
        for name, (out, inp) in shapes.items():
            st = (top * steps.uniform(0.5, 1.5, (out, inp // gs))).astype(np.float16).astype(np.float32)
            block[f"{name}.weight"] = codes.integers(0, 2**32, (out, inp * bits // 32), dtype=np.uint32)
            if bits == 1:  # value s * (2q - 1): affine scale 2s
                block[f"{name}.scales"] = (st * 2.0 ** (shift - 1)).astype(np.float16)
            else:  # zero-mean affine component: bias = -scale * (2^b - 1) / 2
                s = st * 2.0**shift
                block[f"{name}.scales"] = s.astype(np.float16)
                block[f"{name}.biases"] = (-s * ((2**bits - 1) / 2)).astype(np.float16)
        yield block
        tick()


def _write_dense(writer: StoreWriter, hf: dict, seed: int, quantization: dict | None):
    """Random-init mlx-lm model minus the experts, quantized and written; returns (config, switches, shapes)."""
    mx.random.seed(seed)
    model, config = build_model(hf)  # lazy init: the expert stacks are never evaluated
    switches = {layer_of(p): p for p, _ in switch_modules(model)}
    shapes: dict[str, tuple[int, int]] = {}
    for _, switch in switch_modules(model):
        for name in projection_names(switch):
            proj = getattr(switch, name)
            shapes[name] = tuple(proj.weight.shape[1:])
            for key in list(proj.keys()):
                proj[key] = mx.zeros((0,))  # drop expert parameters (_dense_params skips empties)
    _quantize_dense(model, quantization, lambda p: True)
    dtype = getattr(mx, DENSE_DTYPE)
    writer.write_dense_shard(_dense_params(model, dtype))
    for l, layer in enumerate(decoder_layers(model)):
        writer.write_dense_shard(_dense_params(layer, dtype, prefix=f"model.layers.{l}"))
    del model
    mx.clear_cache()
    return config, switches, shapes


def make_synthetic_store(
    out: str | Path,
    *,
    layers: int = 6,
    hidden: int = 2048,
    moe_intermediate: int = 768,
    experts: int = 128,
    top_k: int = 8,
    spec: mwq.MWQSpec = mwq.DEFAULT_SPEC,
    dense_bits: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a random-weight qwen3_moe store at ``out``; returns its path.

    ``progress(done, total)`` is called after each expert block written.
    Raises FileExistsError if ``out`` exists and not ``overwrite``.
    """
    if dense_bits not in DENSE_BITS:
        raise ValueError(f"dense_bits must be one of {DENSE_BITS} (0 = not quantized), got {dense_bits}")
    if layers < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"need layers >= 1 and 1 <= top_k <= experts, got {layers}, {top_k}, {experts}")
    for what, dim in (("hidden", hidden), ("moe_intermediate", moe_intermediate)):
        if dim <= 0 or dim % spec.group_size:
            raise ValueError(f"{what}={dim} must be a positive multiple of the group size {spec.group_size}")
    hf = synthetic_hf_config(layers, hidden, moe_intermediate, experts, top_k)
    quantization = {"group_size": DENSE_GROUP_SIZE, "bits": dense_bits, "mode": "affine"} if dense_bits else None
    total = layers * spec.num_levels * experts
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    with StoreWriter(out, overwrite=overwrite) as writer:
        config, switches, shapes = _write_dense(writer, hf, seed, quantization)
        for l in sorted(switches):
            for c in range(spec.num_levels):
                writer.write_expert_file(l, c, expert_blocks(spec, c, shapes, seed, l, experts, tick))
        out_config = dict(config)
        if quantization:
            out_config["quantization"] = quantization
        writer.write_json("config.json", out_config)
        writer.write_json(ORIGINAL_CONFIG, hf)
        src = bundled_model()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                writer.copy_file(src / name, name)
        manifest = {
            "model_type": config["model_type"],
            "converter": f"d2moe-mlx {__version__}",
            "source": "synthetic",
            "mwq": {**spec.to_dict(), "nested": True},
            "num_experts": experts,
            "switch_modules": {str(l): p for l, p in sorted(switches.items())},
            "projections": {n: {"shape": list(s), "bias": False} for n, s in shapes.items()},
            "dense": {"bits": dense_bits, "group_size": DENSE_GROUP_SIZE, "dtype": DENSE_DTYPE},
            "calibration": {"tokens": 0, "seq_len": 0, "source": "synthetic: random weights"},
        }
        return writer.finalize(manifest)


def store_bytes(path: Path) -> tuple[int, int]:
    """(all bytes, expert-file bytes) of a store directory."""
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total, sum(f.stat().st_size for f in (path / "experts").iterdir())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="store directory to create")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--spec", default="2,2,4",
                   help="MWQ component bits: base, then each plane (2,2,4 = levels of 2, 4, 8 bits)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dense-bits", type=int, default=8, help="0 keeps dense weights in bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        spec = parse_spec(a.spec, a.group_size)
        with progress_bar("expert blocks") as progress:
            path = make_synthetic_store(
                a.out, layers=a.layers, hidden=a.hidden, moe_intermediate=a.moe_intermediate,
                experts=a.experts, top_k=a.top_k, spec=spec, dense_bits=a.dense_bits, seed=a.seed,
                overwrite=a.overwrite, progress=progress,
            )
    except (ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    total, expert = store_bytes(path)
    print(f"wrote {path}: {format_bytes(total)} ({total} bytes; experts {format_bytes(expert)}) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
