"""Validation of a store's manifest against its files (see docs/FORMAT.md).

Everything is checked before anything is allocated or read: file names stay
inside the store, sizes, offsets, shapes and dtypes are bounded, and only JSON
is parsed. A damaged or malicious store fails here with a StoreError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from . import format as F
from .format import StoreError, TensorSpec

CONVERT_HINT = "re-run `d2moe convert` to rebuild the store"


def load_json(path: Path, what: str, limit: int):
    """Parse a small JSON file of the store, refusing non-regular or oversized files."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing {what}; {CONVERT_HINT}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: {what} is not a regular file; {CONVERT_HINT}")
    if st.st_size > limit:
        raise StoreError(f"{path}: {what} is {st.st_size} bytes (limit {limit}); {CONVERT_HINT}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path}: {what} is not valid JSON ({e}); {CONVERT_HINT}") from None


def _int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def validate_store(root: Path) -> tuple[dict, dict, dict]:
    """Validate the store at ``root`` (resolved); returns (manifest, config, expert entries)."""
    mpath = root / F.MANIFEST_NAME
    m = load_json(mpath, "manifest", F.MAX_MANIFEST_BYTES)
    if not isinstance(m, dict):
        raise StoreError(f"{mpath}: manifest is not a JSON object; {CONVERT_HINT}")
    if m.get("format") != F.FORMAT_NAME:
        raise StoreError(f"{mpath}: format is {m.get('format')!r}, expected "
                         f"{F.FORMAT_NAME!r}; this is not a d2moe store")
    ver = m.get("version")
    if type(ver) is not int or ver < 1:
        raise StoreError(f"{mpath}: invalid format version {ver!r}; {CONVERT_HINT}")
    if ver > F.FORMAT_VERSION:
        raise StoreError(
            f"{mpath}: store format version {ver} is newer than the supported version "
            f"{F.FORMAT_VERSION}; upgrade d2moe-mlx (pip install -U d2moe-mlx)"
        )

    def bad(what: str) -> StoreError:
        return StoreError(f"{mpath}: {what}; {CONVERT_HINT}")

    files = m.get("files")
    if not isinstance(files, dict):
        raise bad("'files' must be an object")
    for name, info in files.items():
        p = _safe(root, name, mpath)
        if not (isinstance(info, dict) and _int(info.get("size"), 0, 1 << 50)
                and _int(info.get("crc32"), 0, 0xFFFFFFFF)):
            raise bad(f"file entry {name!r} needs integer 'size' and 'crc32'")
        _stat(p, info["size"])
    dense = m.get("dense_files", [])
    if not isinstance(dense, list) or not all(isinstance(d, str) and d in files for d in dense):
        raise bad("'dense_files' must list files of the 'files' section")
    if F.CONFIG_NAME not in files:
        raise bad(f"{F.CONFIG_NAME} is not listed in 'files'")

    entries = _validate_experts(root, m, mpath)
    config = load_json(root / F.CONFIG_NAME, "model config", F.MAX_JSON_FILE_BYTES)
    if not isinstance(config, dict):
        raise StoreError(f"{root / F.CONFIG_NAME}: config is not a JSON object; {CONVERT_HINT}")
    return m, config, entries


def _safe(root: Path, name, mpath: Path) -> Path:
    if not F.is_plain_relpath(name) or name == F.MANIFEST_NAME:
        raise StoreError(f"{mpath}: file name {name!r} is not a plain relative path "
                         f"inside the store; refusing to open it")
    p = root / name
    try:
        real = p.resolve()
    except (OSError, RuntimeError):
        raise StoreError(f"{p}: cannot resolve path (symlink loop?)") from None
    if not real.is_relative_to(root):
        raise StoreError(f"{p}: resolves to {real}, outside the store {root}; refusing it")
    return p

def _stat(p: Path, size: int) -> None:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise StoreError(f"{p}: file is missing; {CONVERT_HINT}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{p}: not a regular file; {CONVERT_HINT}")
    if st.st_size != size:
        kind = "truncated" if st.st_size < size else "larger than recorded"
        raise StoreError(f"{p}: {kind}: {st.st_size} bytes on disk, manifest says "
                         f"{size}; {CONVERT_HINT}")

def _validate_experts(root: Path, m: dict, mpath: Path) -> dict:
    def bad(what: str) -> StoreError:
        return StoreError(f"{mpath}: {what}; {CONVERT_HINT}")

    sec = m.get("experts")
    if not isinstance(sec, dict) or not isinstance(sec.get("files"), list):
        raise bad("'experts' must be an object with a 'files' list")
    if sec.get("block_align") != F.BLOCK_ALIGN or sec.get("tensor_align") != F.TENSOR_ALIGN:
        raise bad(f"expert alignment must be {F.BLOCK_ALIGN}/{F.TENSOR_ALIGN}")
    if sec.get("checksum") != F.CHECKSUM:
        raise bad(f"unknown block checksum {sec.get('checksum')!r}")
    if len(sec["files"]) > F.MAX_LAYERS * F.MAX_COMPONENTS:
        raise bad("too many expert files")
    entries: dict[tuple[int, int], dict] = {}
    for i, e in enumerate(sec["files"]):
        if not isinstance(e, dict):
            raise bad(f"expert file entry {i} is not an object")
        layer, comp, nb = e.get("layer"), e.get("component"), e.get("num_blocks")
        bb, stride = e.get("block_bytes"), e.get("block_stride")
        if not (_int(layer, 0, F.MAX_LAYERS - 1) and _int(comp, 0, F.MAX_COMPONENTS - 1)
                and _int(nb, 1, F.MAX_EXPERTS) and _int(bb, 0, F.MAX_BLOCK_BYTES)
                and _int(stride, F.BLOCK_ALIGN, F.MAX_BLOCK_BYTES)):
            raise bad(f"expert file entry {i}: layer/component/num_blocks/block_bytes/"
                      "block_stride missing or out of range")
        where = f"expert file entry {i} (layer {layer}, component {comp})"
        if e.get("file") != F.expert_file_name(layer, comp):
            raise bad(f"{where}: file must be {F.expert_file_name(layer, comp)!r}, "
                      f"got {e.get('file')!r}")
        if stride % F.BLOCK_ALIGN or bb > stride:
            raise bad(f"{where}: block_stride {stride} must be a multiple of "
                      f"{F.BLOCK_ALIGN} and >= block_bytes {bb}")
        if (layer, comp) in entries:
            raise bad(f"{where}: listed twice")
        crcs = e.get("crc32")
        if not (isinstance(crcs, list) and len(crcs) == nb
                and all(_int(c, 0, 0xFFFFFFFF) for c in crcs)):
            raise bad(f"{where}: 'crc32' must list {nb} unsigned 32-bit integers")
        specs = _validate_layout(e.get("tensors"), bb, where, bad)
        p = _safe(root, e["file"], mpath)
        _stat(p, nb * stride)
        entries[(layer, comp)] = {**e, "specs": specs, "path": p}
    layers = {k[0] for k in entries}
    for layer in layers:
        comps = sorted(c for l, c in entries if l == layer)
        if comps != list(range(len(comps))):
            raise bad(f"layer {layer} has components {comps}; need 0..n-1")
    nbs = {e["num_blocks"] for e in entries.values()}
    if len(nbs) > 1:
        raise bad(f"expert files disagree on the number of experts {sorted(nbs)}")
    if "num_experts" in m and nbs and m["num_experts"] != next(iter(nbs)):
        raise bad(f"num_experts {m['num_experts']!r} != blocks per expert file {nbs}")
    if "moe_layers" in m and m["moe_layers"] != sorted(layers):
        raise bad(f"moe_layers {m['moe_layers']!r} != layers of expert files {sorted(layers)}")
    return entries

def _validate_layout(tensors, block_bytes: int, where: str, bad) -> list[TensorSpec]:
    if not isinstance(tensors, list) or not 1 <= len(tensors) <= F.MAX_TENSORS_PER_BLOCK:
        raise bad(f"{where}: 'tensors' must list 1..{F.MAX_TENSORS_PER_BLOCK} tensors")
    specs, names = [], set()
    for t in tensors:
        if not isinstance(t, dict):
            raise bad(f"{where}: tensor entry is not an object")
        name, dt, shape, off = t.get("name"), t.get("dtype"), t.get("shape"), t.get("offset")
        if not isinstance(name, str) or not name or len(name) > F.MAX_NAME_LEN or name in names:
            raise bad(f"{where}: bad or duplicate tensor name {name!r}")
        if not isinstance(dt, str) or dt not in F.DTYPES:
            raise bad(f"{where}: tensor {name!r} has dtype {dt!r}, allowed {sorted(F.DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= F.MAX_NDIM
                and all(_int(d, 0, F.MAX_BLOCK_BYTES) for d in shape)):
            raise bad(f"{where}: tensor {name!r} has a bad shape {shape!r}")
        if not _int(off, 0, F.MAX_BLOCK_BYTES) or off % F.TENSOR_ALIGN:
            raise bad(f"{where}: tensor {name!r} offset {off!r} is out of range or not "
                      f"a multiple of {F.TENSOR_ALIGN}")
        spec = TensorSpec(name, dt, tuple(shape), off)
        if spec.nbytes > block_bytes or off + spec.nbytes > block_bytes:
            raise bad(f"{where}: tensor {name!r} ({spec.nbytes} bytes at {off}) does "
                      f"not fit in block_bytes {block_bytes}")
        names.add(name)
        specs.append(spec)
    by_off = sorted(specs, key=lambda s: s.offset)
    for a, b in zip(by_off, by_off[1:]):
        if a.offset + a.nbytes > b.offset:
            raise bad(f"{where}: tensors {a.name!r} and {b.name!r} overlap")
    return specs

