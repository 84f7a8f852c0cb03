"""Validation of a store's manifest against its files (see docs/FORMAT.md).

Everything is checked before anything is allocated or read: file names stay
inside the store, sizes, offsets, shapes and dtypes are bounded, the sections the
runtime reads (mwq, switch_modules, projections, dense) are well formed and fit
the expert files, and only JSON is parsed. A damaged or malicious store fails
here with a StoreError.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

from ..mwq import MWQSpec
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
    _validate_model(m, entries, bad)
    from .extras import validate_extras

    validate_extras(root, m, bad)
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


def _validate_model(m: dict, entries: dict, bad) -> None:
    """The sections the runtime reads, and their fit with the expert files (all or none)."""
    if not any(k in m for k in F.MODEL_KEYS):
        return  # a bare expert container (tests, tools): nothing for the runtime to load
    missing = [k for k in F.MODEL_KEYS if k not in m]
    if missing:
        raise bad(f"{', '.join(repr(k) for k in missing)} missing: a model's manifest has all "
                  f"of {', '.join(F.MODEL_KEYS)}")
    if not (isinstance(m["model_type"], str) and 0 < len(m["model_type"]) <= F.MAX_NAME_LEN):
        raise bad(f"'model_type' must be a non-empty string, got {_show(m['model_type'], 80)}")
    spec = _mwq_spec(m["mwq"], bad)
    per_layer = Counter(layer for layer, _ in entries)
    layers = sorted(per_layer)
    for layer in layers:
        if per_layer[layer] != spec.num_levels:
            raise bad(f"layer {layer} has {per_layer[layer]} components (expert files) but "
                      f"'mwq' {_show(m['mwq'], 200)} has {spec.num_levels} levels")
    _check_switch_modules(m["switch_modules"], layers, bad)
    _check_dense(m["dense"], bad)
    _check_calibration(m.get("calibration", {}), bad)
    projections = _projections(m["projections"], spec, bad)
    for (layer, c), e in sorted(entries.items()):
        bits = spec.component_bits(c)
        want = F.component_tensors(projections, bits, spec.group_size, c)
        got = {t.name: t for t in e["specs"]}
        where = f"{e['file']} (layer {layer}, component {c}, {bits}-bit)"
        if set(got) != set(want):
            raise bad(f"{where}: tensors do not match 'projections' and 'mwq': missing "
                      f"{sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}")
        for name, (dtypes, shape) in want.items():
            t = got[name]
            if t.dtype not in dtypes or t.shape != shape:
                raise bad(f"{where}: tensor {name!r} is {t.dtype} {list(t.shape)}; 'projections' "
                          f"and 'mwq' imply {' or '.join(dtypes)} {list(shape)}")


def _mwq_spec(d, bad) -> MWQSpec:
    """The MWQ spec of 'mwq', strictly typed, with MWQSpec's own rules."""
    if not (isinstance(d, dict) and _int(d.get("base_bits"), 0, 64)
            and _int(d.get("group_size"), 1, F.MAX_BLOCK_BYTES)
            and isinstance(d.get("plane_bits"), list) and len(d["plane_bits"]) < F.MAX_COMPONENTS
            and all(_int(b, 0, 64) for b in d["plane_bits"])):
        raise bad("'mwq' must be {\"base_bits\": int, \"plane_bits\": [int, ...], "
                  f"\"group_size\": int}}, got {_show(d, 200)}")
    if not isinstance(d.get("nested", False), bool):
        raise bad(f"'mwq' nested must be true or false, got {_show(d['nested'], 50)}")
    try:
        return MWQSpec.from_dict(d)
    except ValueError as e:
        raise bad(f"'mwq' is {_show(d, 200)}: {e}") from None


def _check_switch_modules(d, layers: list[int], bad) -> None:
    if not (isinstance(d, dict) and all(
            isinstance(k, str) and len(k) <= 5 and k.isascii() and k.isdigit() and k == str(int(k))
            and isinstance(v, str) and 0 < len(v) <= 4 * F.MAX_NAME_LEN for k, v in d.items())):
        raise bad(f"'switch_modules' must map layer numbers to module paths, like "
                  f"{{\"0\": \"model.layers.0.mlp.switch_mlp\"}}, got {_show(d, 200)}")
    if sorted(int(k) for k in d) != layers:
        raise bad(f"'switch_modules' names layers {_show(sorted(int(k) for k in d), 80)}, the "
                  f"expert files have layers {_show(layers, 80)}")


def _check_dense(d, bad) -> None:
    if not isinstance(d, dict):
        raise bad(f"'dense' must be an object with bits, group_size and dtype, got {_show(d, 80)}")
    for key, allowed in (("dtype", F.DENSE_DTYPES), ("bits", F.DENSE_BITS),
                         ("group_size", F.DENSE_GROUP_SIZES)):
        v = d.get(key)
        if type(v) is not type(allowed[0]) or v not in allowed:
            raise bad(f"'dense' {key} is {_show(v, 80)}, expected one of {_show(list(allowed), 80)}")


def _check_calibration(d, bad) -> None:
    ok = isinstance(d, dict) and all(
        _int(d[k], 0, 1 << 62) for k in ("tokens", "seq_len") if k in d)
    if not ok or not isinstance(d.get("source", ""), str):
        raise bad(f"'calibration' must be {{\"tokens\": int, \"seq_len\": int, \"source\": str}}, "
                  f"got {_show(d, 200)}")


def _projections(d, spec: MWQSpec, bad) -> dict[str, tuple[int, int, bool]]:
    """'projections' as {name: (out, in, has_bias)}; `in` must split into groups and words."""
    if not isinstance(d, dict) or not 1 <= len(d) <= F.MAX_TENSORS_PER_BLOCK:
        raise bad(f"'projections' must map 1..{F.MAX_TENSORS_PER_BLOCK} projection names to "
                  f"{{\"shape\": [out, in], \"bias\": bool}}, got {_show(d, 200)}")
    out = {}
    for name, p in d.items():
        shape = p.get("shape") if isinstance(p, dict) else None
        if not (isinstance(name, str) and 0 < len(name) <= F.MAX_NAME_LEN and "." not in name
                and isinstance(shape, list) and len(shape) == 2
                and all(_int(n, 1, F.MAX_BLOCK_BYTES) for n in shape)
                and isinstance(p.get("bias"), bool)):
            raise bad(f"'projections' entry {_show(name, 80)} must be {{\"shape\": [out, in], "
                      f"\"bias\": bool}} with a name without dots, got {_show(p, 200)}")
        if shape[1] % spec.group_size:
            raise bad(f"'projections' {name!r}: input width {shape[1]} is not a multiple of the "
                      f"'mwq' group_size {spec.group_size}")
        out[name] = (shape[0], shape[1], p["bias"])
    return out


def _show(value, limit: int) -> str:
    """A manifest value as JSON, cut to ``limit`` characters for a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
