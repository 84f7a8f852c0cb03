"""Tiny quantized checkpoints in the on-disk layouts of real repos, for the source-format tests.

Each is built from a tiny random float32 checkpoint of scripts/make_test_checkpoints.py:

* ``fp8``: deepseek_v3 like DeepSeek-V3: every linear weight of the decoder layers
  (not the router ``mlp.gate``) as float8 e4m3 (``F8_E4M3``) with a float32
  ``weight_scale_inv`` per 128x128 block, and ``quantization_config``
  ``{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}``;
* ``mxfp4``: gpt_oss like gpt-oss: ``mlp.experts.{gate_up,down}_proj_blocks`` (uint8
  [E, out, in/32, 16], two e2m1 values per byte, low nibble first) and ``_scales``
  (uint8 e8m0 [E, out, in/32]), ``quantization_config`` ``{"quant_method": "mxfp4",
  "modules_to_not_convert": [...]}``;
* ``mlx4`` / ``mlx8``: qwen3_moe quantized by mlx-lm's own ``quantize_model`` and
  ``save_model`` (uint32 codes, bfloat16 scales/biases, config ``"quantization"`` with
  a per-module override: the routers at 8 bits, as mlx-lm's mixed recipes write).

    python scripts/make_format_checkpoints.py fp8 /tmp/fp8
    python scripts/make_format_checkpoints.py --all /tmp/formats   # OUT/<format>
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMATS = ("fp8", "mxfp4", "mlx4", "mlx8")
FAMILY = {"fp8": "deepseek_v3", "mxfp4": "gpt_oss", "mlx4": "qwen3_moe", "mlx8": "qwen3_moe"}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MXFP4_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def fp8_quantize(w, block: int = 128):
    """(e4m3 torch tensor, float32 scale_inv [ceil(out/b), ceil(in/b)]) of a 2-D torch weight:
    DeepSeek's scheme, each block scaled so its largest magnitude maps to 448."""
    import torch

    m, n = w.shape
    rows, cols = -(-m // block), -(-n // block)
    pad = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    pad[:m, :n] = w.float()
    blocks = pad.reshape(rows, block, cols, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = (amax / 448.0).float()
    q = (blocks / scale[:, None, :, None]).reshape(rows * block, cols * block)[:m, :n]
    return q.to(torch.float8_e4m3fn), scale


def mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks [..., G, 16] uint8, scales [..., G] uint8) of w [..., in] (OCP MX: shared
    exponent floor(log2(amax)) - 2, values rounded to the nearest e2m1)."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(g).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, -127).clip(-127, 127).astype(np.int32)
    x = g / np.ldexp(1.0, exp)[..., None]
    mag = np.abs(x)[..., None]
    idx = np.argmin(np.abs(mag - _E2M1), axis=-1).astype(np.uint8)  # nearest; ties to the smaller code
    nib = idx | np.where(x < 0, 8, 0).astype(np.uint8)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save(out: Path, tensors: dict, config: dict, src: Path) -> None:
    """Write the tensors and config.json: the config with transformers-4 rope fields
    (rope_theta, rope_scaling) beside transformers-5's rope_parameters, as the real repos
    have them, so that mlx-lm's own loader reads it right."""
    from safetensors.torch import save_file

    from d2moe_mlx.convert.hf_config import normalize_config

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(normalize_config(config), indent=2))
    for f in src.iterdir():  # tokenizer and generation config
        if f.suffix in (".json", ".jinja", ".txt") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)


def make_fp8(src: Path, out: Path) -> None:
    tensors, config = _load(src), json.loads((src / "config.json").read_text())
    result = {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith(".weight") and t.ndim == 2 and not name.endswith("mlp.gate.weight"):
            q, s = fp8_quantize(t)
            result[name], result[name + "_scale_inv"] = q, s
        else:
            result[name] = t
    config["quantization_config"] = dict(FP8_CONFIG)
    _save(out, result, config, src)


def make_mxfp4(src: Path, out: Path) -> None:
    import torch

    tensors, config = _load(src), json.loads((src / "config.json").read_text())
    result = {}
    for name, t in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = mxfp4_quantize(t.transpose(-1, -2).numpy())  # [E, in, out] -> [E, out, in]
            result[name + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            result[name + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
        else:
            result[name] = t
    config["quantization_config"] = dict(MXFP4_CONFIG)
    _save(out, result, config, src)


def make_mlx(src: Path, out: Path, bits: int) -> None:
    """mlx-lm's own quantization and writer, on mlx-lm's model of ``src`` (normalised config,
    bfloat16 like the mlx-community repos)."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    from d2moe_mlx.convert.hf_config import load_mlx_reference

    model, config = load_mlx_reference(src, dtype="bfloat16")

    def routers_at_8(path, module):
        return {"group_size": 64, "bits": 8} if path.endswith("mlp.gate") else True

    model, config = quantize_model(model, config, 64, bits, quant_predicate=routers_at_8)
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, donate_model=True)
    save_config(config, config_path=out / "config.json")
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)


FP8_OVERRIDES = {"moe_intermediate_size": 192}  # experts [192, 64] / [64, 192]: a second, partial block


def make_format_checkpoint(fmt: str, out: Path, seed: int = 0, base: Path | None = None, **overrides) -> Path:
    """Write the tiny ``fmt`` checkpoint (one of FORMATS) to ``out``; returns ``out``.
    ``base``: the float32 checkpoint of ``FAMILY[fmt]`` to start from (default: a new one,
    with ``overrides``; for fp8 ``FP8_OVERRIDES`` too)."""
    from make_test_checkpoints import make_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "fp8":
        overrides = {**FP8_OVERRIDES, **overrides}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(base) if base is not None else make_checkpoint(FAMILY[fmt], Path(tmp), seed, **overrides)
        if fmt == "fp8":
            make_fp8(src, out)
        elif fmt == "mxfp4":
            make_mxfp4(src, out)
        else:
            make_mlx(src, out, int(fmt[3:]))
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("format", nargs="?", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("out", type=Path, help="directory to write (with --all: one subdirectory per format)")
    p.add_argument("--all", action="store_true", help="every format, in OUT/<format>")
    p.add_argument("--seed", type=int, default=0, help="seed of the underlying random checkpoint")
    args = p.parse_args(argv)
    if args.all == bool(args.format):
        p.error("give either FORMAT or --all")
    for fmt in FORMATS if args.all else (args.format,):
        out = args.out / fmt if args.all else args.out
        make_format_checkpoint(fmt, out, args.seed)
        print(f"{fmt} ({FAMILY[fmt]}): {out}")


if __name__ == "__main__":
    main()
