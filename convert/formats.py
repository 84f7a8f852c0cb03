"""Source weight formats: detect how a checkpoint stores its weights, and dequantise them
one layer at a time.

Supported (docs/SOURCES.md):

* ``float``: bfloat16 / float16 / float32 safetensors (nothing to do);
* ``fp8``: DeepSeek-V3-style float8 e4m3 weights with one float32 ``weight_scale_inv``
  per 128x128 block (``quantization_config.quant_method == "fp8"``);
* ``mxfp4``: gpt-oss's ``*_blocks`` (two e2m1 values per byte, low nibble first) and
  ``*_scales`` (e8m0 exponents, one per 32 values) (``quant_method == "mxfp4"``);
* ``mlx``: an mlx-lm quantized checkpoint (config ``"quantization"``: ``weight`` uint32
  packed codes, ``scales``, ``biases``; per-module overrides).

Everything here is lazy MLX: dequantising a layer's tensors builds graphs that the
converter evaluates when it loads that layer, so peak memory stays near one layer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .source import SourceError, safetensors_files

SUPPORTED_METHODS = ("fp8", "mxfp4", "mlx (config 'quantization')")
MLX_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
_FLOAT_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what its safetensors header says."""

    file: str
    dtype: str  # safetensors dtype name: "F8_E4M3", "U8", "BF16", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SourceFormat:
    """How the checkpoint stores its weights (see the module docstring)."""

    kind: str  # "float", "fp8", "mxfp4", "mlx"
    dtype: mx.Dtype = mx.float32  # what quantized weights dequantise to
    block: tuple[int, int] = (128, 128)  # fp8 scale blocks [rows, cols]
    quantization: dict = field(default_factory=dict)  # mlx: config["quantization"]
    index: dict = field(default_factory=dict)  # name -> TensorInfo

    def params(self, module: str) -> dict | None:
        """mlx: the quantization {group_size, bits, mode} of ``module`` (None: not quantized)."""
        q = self.quantization
        override = q.get(module)
        if override is False:
            return None
        base = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}
        if isinstance(override, dict):
            base.update({k: override[k] for k in ("group_size", "bits", "mode") if k in override})
        return base

    def where(self, name: str) -> str:
        info = self.index.get(name)
        return f"{name} in {info.file}" if info else name


def read_index(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's file, dtype and shape from the safetensors headers (no data read)."""
    index = {}
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SourceError(f"{file} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"{file}: unreadable safetensors header: {e}") from e
        for name, meta in header.items():
            if name != "__metadata__":
                index[name] = TensorInfo(file.name, meta["dtype"], tuple(meta["shape"]))
    return index


def detect_format(path: Path, config: dict, index: dict[str, TensorInfo] | None = None) -> SourceFormat:
    """The checkpoint's weight format, from config.json and the tensor headers."""
    index = read_index(path) if index is None else index
    cfg_file = path / "config.json"
    dtype = _FLOAT_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), mx.bfloat16)
    quant = config.get("quantization")
    qc = config.get("quantization_config")
    if isinstance(quant, dict):  # mlx-lm writes "quantization" (and a copy as quantization_config)
        mode = quant.get("mode", "affine")
        if mode not in MLX_MODES:
            raise SourceError(f"{cfg_file}: mlx quantization mode {mode!r} is not supported; "
                              f"supported modes: {', '.join(MLX_MODES)}")
        return SourceFormat("mlx", mx.float32, quantization=quant, index=index)
    if isinstance(qc, dict):
        method = qc.get("quant_method")
        if method == "fp8":
            fmt = qc.get("fmt", "e4m3")
            if fmt != "e4m3" or qc.get("scale_fmt") not in (None, "fp32", "float32"):
                raise SourceError(f"{cfg_file}: fp8 with fmt={fmt!r}, scale_fmt={qc.get('scale_fmt')!r} is not "
                                  "supported; supported: fmt 'e4m3' with float32 weight_scale_inv")
            block = tuple(int(b) for b in qc.get("weight_block_size", (128, 128)))
            if len(block) != 2 or min(block) <= 0:
                raise SourceError(f"{cfg_file}: weight_block_size {qc.get('weight_block_size')} is not [rows, cols]")
            return SourceFormat("fp8", dtype, block=block, index=index)
        if method == "mxfp4":
            return SourceFormat("mxfp4", dtype, index=index)
        raise SourceError(f"{cfg_file}: quantization_config.quant_method {method!r} is not supported; "
                          f"supported quantized sources: {', '.join(SUPPORTED_METHODS)}, or bf16/fp16/fp32 weights")
    if any(n.endswith(".weight_scale_inv") for n in index):
        return SourceFormat("fp8", dtype, index=index)
    if any(n.endswith("_blocks") for n in index):
        return SourceFormat("mxfp4", dtype, index=index)
    return SourceFormat("float", index=index)


def validate(fmt: SourceFormat) -> None:
    """Check from the headers alone that every quantized tensor has its scales, in the right
    shape, before any work; errors name the tensor and its file."""
    idx = fmt.index
    if fmt.kind == "fp8":
        for name, info in idx.items():
            if name.endswith(".weight_scale_inv"):
                weight = name[: -len("_scale_inv")]
                if weight not in idx:
                    raise SourceError(f"{fmt.where(name)} has no weight {weight} beside it")
                m, n = idx[weight].shape[-2:]
                want = (-(-m // fmt.block[0]), -(-n // fmt.block[1]))
                if info.shape != want:
                    raise SourceError(f"{fmt.where(name)} has shape {list(info.shape)}; the [{m}, {n}] weight "
                                      f"with {fmt.block[0]}x{fmt.block[1]} blocks needs {list(want)}")
            elif info.dtype.startswith("F8"):
                if info.dtype != "F8_E4M3":
                    raise SourceError(f"{fmt.where(name)} is {info.dtype}; only F8_E4M3 weights are supported")
                if name + "_scale_inv" not in idx:
                    raise SourceError(f"{fmt.where(name)} is FP8 (F8_E4M3) but its block scale {name}_scale_inv "
                                      "is missing: every FP8 weight needs a float32 weight_scale_inv")
    elif fmt.kind == "mxfp4":
        for name, info in idx.items():
            if name.endswith("_blocks"):
                scales = name[: -len("_blocks")] + "_scales"
                if scales not in idx:
                    raise SourceError(f"{fmt.where(name)} has no {scales} beside it (MXFP4 needs both)")
                if info.dtype != "U8" or len(info.shape) < 2 or info.shape[-1] != 16:
                    raise SourceError(f"{fmt.where(name)} is {info.dtype} {list(info.shape)}; MXFP4 blocks are "
                                      "U8 [..., groups, 16]")
                if idx[scales].shape != info.shape[:-1] or idx[scales].dtype != "U8":
                    raise SourceError(f"{fmt.where(scales)} is {idx[scales].dtype} {list(idx[scales].shape)}; its "
                                      f"blocks need U8 {list(info.shape[:-1])} (one e8m0 exponent per 32 values)")
            elif name.endswith("_scales") and name[: -len("_scales")] + "_blocks" not in idx:
                raise SourceError(f"{fmt.where(name)} has no {name[: -len('_scales')]}_blocks beside it")
    elif fmt.kind == "mlx":
        for name in [n for n in idx if n.endswith(".scales")]:
            module = name[: -len(".scales")]
            p = fmt.params(module)
            if p is None:
                raise SourceError(f"{fmt.where(name)}: config.json marks {module} as not quantized but it has scales")
            if module + ".weight" not in idx:
                raise SourceError(f"{fmt.where(name)} has no {module}.weight beside it")
            shapes = {k: _Shape(idx[k].shape, idx[k].dtype) for k in (module + ".weight", name, module + ".biases")
                      if k in idx}
            check_mlx_shapes(fmt, module, shapes, p)


@dataclass(frozen=True)
class _Shape:
    """A tensor's header, standing in for the array in :func:`check_mlx_shapes`."""

    shape: tuple
    st_dtype: str

    @property
    def dtype(self):
        return mx.uint32 if self.st_dtype == "U32" else self.st_dtype


# -- FP8 e4m3 ------------------------------------------------------------------------

def e4m3_table() -> np.ndarray:
    """The float32 value of each of the 256 float8 e4m3fn bit patterns (0x7f/0xff: NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return (sign * val).astype(np.float32)


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, block: tuple[int, int], dtype=mx.float32,
                   name: str = "weight") -> mx.array:
    """``weight`` (e4m3 bits as uint8, [out, in]) times its block scale, as ``dtype``; edge
    blocks (dims not multiples of the block) are partial."""
    if weight.ndim != 2 or weight.dtype not in (mx.uint8, mx.int8):
        raise SourceError(f"{name}: an FP8 weight must be 2-D e4m3 bytes, got {weight.dtype} {weight.shape}")
    m, n = weight.shape
    rows, cols = -(-m // block[0]), -(-n // block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise SourceError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, a [{m}, {n}] weight "
                          f"with {block[0]}x{block[1]} blocks needs [{rows}, {cols}]")
    w = mx.take(mx.array(e4m3_table()), weight.view(mx.uint8).astype(mx.uint32))
    s = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), block[0], axis=0), block[1], axis=1)[:m, :n]
    return (w * s).astype(dtype)


# -- MXFP4 ---------------------------------------------------------------------------

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                np.float32)
E2M1_PAIRS = np.stack([np.tile(E2M1, 16), np.repeat(E2M1, 16)], axis=-1)  # byte b -> (low nibble, high nibble)


def dequantize_mxfp4(blocks: mx.array, scales: mx.array, dtype=mx.float32, name: str = "blocks") -> mx.array:
    """``blocks`` [..., G, 16] uint8 (value 2j in the low nibble of byte j, 2j+1 in the
    high one) times 2^(scale - 127) per 32 values -> [..., G * 32] ``dtype``.

    Each byte is looked up whole (a 256 x 2 table, indexed by the uint8 codes themselves)
    and, for bfloat16, multiplied in bfloat16: an e2m1 value times a power of two has at
    most 3 significant bits and bfloat16 has float32's exponent range, so the result is
    exact and no float32 or widened-code copy of the stack is made (for a gpt-oss layer
    that copy is 2-4x the bfloat16 result)."""
    if blocks.dtype != mx.uint8 or blocks.ndim < 2 or blocks.shape[-1] != 16:
        raise SourceError(f"{name}: MXFP4 blocks must be uint8 [..., groups, 16], got {blocks.dtype} {blocks.shape}")
    if scales.dtype != mx.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise SourceError(f"{name}: MXFP4 scales must be uint8 {tuple(blocks.shape[:-1])} (one e8m0 exponent "
                          f"per 32 values), got {scales.dtype} {tuple(scales.shape)}")
    exps = np.ldexp(1.0, np.arange(256) - 127)
    exps[255] = np.nan  # e8m0 0xff is NaN
    work = mx.bfloat16 if dtype == mx.bfloat16 else mx.float32
    pairs = mx.array(E2M1_PAIRS).astype(work)
    w = mx.take(pairs, blocks, axis=0) * mx.take(mx.array(exps.astype(np.float32)).astype(work), scales)[..., None, None]
    return w.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).astype(dtype)


# -- per layer -----------------------------------------------------------------------

def dequantize(fmt: SourceFormat, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """One layer's (or the non-layer) tensors with quantized weights replaced by lazily
    dequantised float ones, named as a float checkpoint of the same layout names them."""
    if fmt.kind == "float":
        return tensors
    if fmt.kind == "fp8":
        return _fp8(fmt, tensors)
    if fmt.kind == "mxfp4":
        return _mxfp4(fmt, tensors)
    return _mlx(fmt, tensors)


def _fp8(fmt: SourceFormat, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    out = {}
    for name, v in tensors.items():
        if name.endswith(".weight_scale_inv"):
            if name[: -len("_scale_inv")] not in tensors:
                raise SourceError(f"{fmt.where(name)} has no weight {name[: -len('_scale_inv')]} beside it")
            continue
        info = fmt.index.get(name)
        is_fp8 = info.dtype.startswith("F8") if info else False
        scale = name + "_scale_inv"
        if is_fp8 and info.dtype != "F8_E4M3":
            raise SourceError(f"{fmt.where(name)} is {info.dtype}; only F8_E4M3 weights are supported")
        if is_fp8 and scale not in tensors:
            raise SourceError(f"{fmt.where(name)} is FP8 (F8_E4M3) but its block scale {scale} is missing "
                              "(checkpoint incomplete? every FP8 weight needs a float32 weight_scale_inv)")
        if scale in tensors:
            if not is_fp8 and v.dtype not in (mx.uint8, mx.int8):
                raise SourceError(f"{fmt.where(name)} has a weight_scale_inv but is {v.dtype}, not FP8")
            v = dequantize_fp8(v, tensors[scale], fmt.block, fmt.dtype, name=fmt.where(scale))
        out[name] = v
    return out


def _mxfp4(fmt: SourceFormat, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    out = {}
    for name, v in tensors.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in tensors:
            continue
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            if base + "_scales" not in tensors:
                raise SourceError(f"{fmt.where(name)} has no {base}_scales beside it (MXFP4 needs both)")
            w = dequantize_mxfp4(v, tensors[base + "_scales"], fmt.dtype, name=fmt.where(base + "_scales"))
            out[base] = w.swapaxes(-1, -2)  # blocks are [E, out, in]; the float layout is [E, in, out]
            continue
        if name.endswith("_scales"):
            raise SourceError(f"{fmt.where(name)} has no {name[: -len('_scales')]}_blocks beside it")
        out[name] = v
    return out


def _mlx(fmt: SourceFormat, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".scales")]:
        module = name[: -len(".scales")]
        w, p = tensors.get(module + ".weight"), fmt.params(module)
        if w is None:
            raise SourceError(f"{fmt.where(name)} has no {module}.weight beside it")
        if p is None:
            raise SourceError(f"{fmt.where(name)}: config.json marks {module} as not quantized but it has scales")
        check_mlx_shapes(fmt, module, tensors, p)
        # Dense weights in float32 (exact: s*q + b); stacked experts [E, out, in] in their
        # scales' dtype (bfloat16 in mlx-community repos), half the memory: the converter
        # only calibrates with them and keeps their codes (from_codes.py).
        sd = tensors[name].dtype
        dtype = sd if w.ndim == 3 and mx.issubdtype(sd, mx.floating) else mx.float32
        s = out.pop(name)  # affine: float scales, widened; mx/nv fp modes: uint8 exponents, as is
        s = s.astype(mx.float32) if p["mode"] == "affine" else s
        b = out.pop(module + ".biases").astype(mx.float32) if p["mode"] == "affine" else None
        out[module + ".weight"] = mx.dequantize(w, s, b, group_size=p["group_size"], bits=p["bits"],
                                                mode=p["mode"]).astype(dtype)
    return out


def check_mlx_shapes(fmt: SourceFormat, module: str, tensors: dict[str, mx.array], p: dict) -> None:
    """The packed weight, scales and biases of an mlx-quantized module agree with its params."""
    w, s = tensors[module + ".weight"], tensors[module + ".scales"]
    if w.dtype != mx.uint32:
        raise SourceError(f"{fmt.where(module + '.weight')} is {w.dtype}; mlx-quantized weights are uint32")
    in_dims = w.shape[-1] * 32 // p["bits"]
    groups = in_dims // p["group_size"]
    if tuple(s.shape) != (*w.shape[:-1], groups):
        raise SourceError(f"{fmt.where(module + '.scales')} has shape {tuple(s.shape)}; {p['bits']}-bit codes "
                          f"{tuple(w.shape)} with group size {p['group_size']} need {(*w.shape[:-1], groups)}")
    if p["mode"] == "affine":
        b = tensors.get(module + ".biases")
        if b is None:
            raise SourceError(f"{fmt.where(module + '.scales')}: affine-quantized {module} has no biases tensor")
        if tuple(b.shape) != tuple(s.shape):
            raise SourceError(f"{fmt.where(module + '.biases')} has shape {tuple(b.shape)}, its scales {tuple(s.shape)}")


def describe(fmt: SourceFormat, inexact: int = 0) -> dict:
    """The manifest's ``source_format``: what the weights were, and for an mlx source
    its quantization and ``inexact_groups``: expert groups whose top level is not the
    source's codes, scale and bias bit for bit (0 = exact everywhere)."""
    out = {"kind": fmt.kind}
    if fmt.kind == "fp8":
        out["block"] = list(fmt.block)
    if fmt.kind == "mlx":
        out["quantization"] = {k: v for k, v in fmt.quantization.items() if not isinstance(v, dict)}
        out["inexact_groups"] = inexact
    return out
