"""Layout constants and helpers of the d2moe expert store (see docs/FORMAT.md).

This module is the one place where the on-disk layout is defined; the writer
and the reader both import from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

FORMAT_NAME = "d2moe-mwq"
FORMAT_VERSION = 1

MANIFEST_NAME = "d2moe.json"
CONFIG_NAME = "config.json"
DENSE_INDEX_NAME = "model.safetensors.index.json"
CALIB_STATS_NAME = "calib_stats.safetensors"
EXPERTS_DIR = "experts"
# Names the writer uses inside its temporary directory only (see writer.py).
MANIFEST_PARTIAL_NAME = MANIFEST_NAME + ".partial"
_PARTIAL_DENSE = re.compile(r"partial-dense-\d{5,}\.safetensors")

BLOCK_ALIGN = 16384  # expert block offsets and strides are multiples of this
TENSOR_ALIGN = 64  # tensor offsets inside a block are multiples of this
CHECKSUM = "crc32"  # zlib.crc32, unsigned 32-bit

# Manifest sections the converter writes for the runtime (docs/FORMAT.md): a manifest
# with any of them must have all of them; a bare expert container has none.
MODEL_KEYS = ("model_type", "mwq", "switch_modules", "projections", "dense")
# Non-expert ("dense") weights: mlx-lm's affine quantization (0 = not quantized) and the
# dtypes of unquantized weights.
DENSE_BITS = (0, 2, 3, 4, 5, 6, 8)
DENSE_GROUP_SIZES = (32, 64, 128)
DENSE_DTYPES = ("float16", "bfloat16", "float32")

# Sanity bounds enforced by the reader before anything is allocated.
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_FILE_BYTES = 64 << 20  # config.json and other small JSON files
MAX_EXPERTS = 1 << 16
MAX_LAYERS = 1 << 16
MAX_COMPONENTS = 64
MAX_TENSORS_PER_BLOCK = 64
MAX_NDIM = 8
MAX_BLOCK_BYTES = 1 << 36  # 64 GiB: far beyond any real expert
MAX_NAME_LEN = 255

# dtype name (as written in the manifest) -> numpy dtype used to view the bytes.
# "bfloat16" has no numpy dtype: it is returned as uint16 words (view it with
# mx.array(a).view(mx.bfloat16)).
DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "uint32": np.dtype("<u4"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
_NP_TO_NAME = {np.dtype(v).str: k for k, v in DTYPES.items() if k != "bfloat16"}


class StoreError(Exception):
    """A store on disk is missing, damaged, unsupported or unsafe.

    The message names the file, says what is wrong and what to do.
    """


def dtype_name(dtype) -> str:
    """Manifest name of a numpy dtype (ValueError if not allowed in a store)."""
    dt = np.dtype(dtype)
    name = _NP_TO_NAME.get(dt.newbyteorder("<").str if dt.byteorder == ">" else dt.str)
    if name is None:
        raise ValueError(
            f"dtype {dt} cannot be stored in an expert block; allowed: {sorted(DTYPES)}"
        )
    return name


def as_numpy(arr) -> tuple[np.ndarray, str]:
    """(C-contiguous little-endian numpy array, manifest dtype name) of a numpy or MLX array.

    An MLX bfloat16 array becomes its uint16 words with dtype name "bfloat16".
    """
    if type(arr).__module__.startswith("mlx"):
        import mlx.core as mx

        if arr.dtype == mx.bfloat16:
            return np.ascontiguousarray(np.array(arr.view(mx.uint16))), "bfloat16"
        arr = np.array(arr)
    a = np.asarray(arr)
    name = dtype_name(a.dtype)
    return np.ascontiguousarray(a, dtype=DTYPES[name]), name


def expert_file_name(layer: int, component: int) -> str:
    """Relative path of the expert file of (MoE layer, MWQ component)."""
    return f"{EXPERTS_DIR}/L{int(layer):03d}.c{int(component)}.bin"


def dense_shard_name(index: int, count: int) -> str:
    """Final name of dense shard `index` (1-based) out of `count`.

    mlx-lm's naming, so `mlx_lm.utils.load_model(store)` (which globs
    model*.safetensors) finds the dense weights.
    """
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def partial_shard_name(index: int) -> str:
    """Temporary name of dense shard ``index`` (0-based) until finalize() renames it."""
    return f"partial-dense-{index:05d}.safetensors"


def is_partial_name(name: str) -> bool:
    """True for the writer's temporary file names (the manifest or a dense shard being written)."""
    return name == MANIFEST_PARTIAL_NAME or bool(_PARTIAL_DENSE.fullmatch(name))


def component_tensors(projections: dict[str, tuple[int, int, bool]], bits: int, group_size: int,
                      component: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The tensors of one MWQ component's block: name -> (allowed dtypes, shape).

    ``projections`` maps each expert projection to (out, in, has_bias). Codes pack
    ``bits`` per weight into uint32 words; scales (and biases, for affine components:
    bits > 1) are one float16 per group; a projection's own ``bias`` is in component 0.
    """
    want = {}
    for name, (out, inp, has_bias) in projections.items():
        want[f"{name}.weight"] = (("uint32",), (out, inp * bits // 32))
        want[f"{name}.scales"] = (("float16",), (out, inp // group_size))
        if bits != 1:
            want[f"{name}.biases"] = (("float16",), (out, inp // group_size))
        if has_bias and component == 0:
            want[f"{name}.bias"] = (("float16", "float32"), (out,))
    return want


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def is_plain_relpath(name: object) -> bool:
    """True for a relative POSIX path without '..', '.', empty parts or odd bytes."""
    if not isinstance(name, str) or not name or len(name) > 4 * MAX_NAME_LEN:
        return False
    if "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    parts = PurePosixPath(name).parts
    if not parts or len(name.split("/")) != len(parts):
        return False  # caught "a//b", "a/", "./a"
    return all(p not in ("", ".", "..") and len(p) <= MAX_NAME_LEN for p in parts)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside an expert block: `offset` is in bytes from the block start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset}


def block_layout(tensors: dict) -> tuple[list[TensorSpec], int]:
    """Lay `tensors` out in insertion order at TENSOR_ALIGN-aligned offsets.

    Returns the specs and block_bytes (end of the last tensor rounded up to
    TENSOR_ALIGN). The block stride is round_up(block_bytes, BLOCK_ALIGN).
    """
    if not tensors:
        raise ValueError("an expert block needs at least one tensor")
    if len(tensors) > MAX_TENSORS_PER_BLOCK:
        raise ValueError(f"too many tensors in one block ({len(tensors)})")
    specs, offset = [], 0
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise ValueError(f"bad tensor name {name!r}")
        a, dt = as_numpy(arr)
        if a.ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {a.ndim} dims (max {MAX_NDIM})")
        spec = TensorSpec(name, dt, tuple(int(d) for d in a.shape), offset)
        specs.append(spec)
        offset = round_up(offset + spec.nbytes, TENSOR_ALIGN)
    return specs, offset
