"""Reader of a d2moe expert store (see docs/FORMAT.md).

`Store.open` validates the whole manifest (names, sizes, offsets, shapes,
dtypes) against the files on disk before anything is allocated or read, so a
damaged or malicious store fails early with a StoreError.
"""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import numpy as np

from . import format as F
from .format import StoreError, TensorSpec
from ..system import open_for_expert_reads, release_pages
from .validate import CONVERT_HINT
from .validate import load_json, validate_store

_CHUNK = 8 << 20


def _preadv_full(fd: int, bufs: list[memoryview], offset: int, path: Path) -> None:
    """Fill `bufs` (in order) from `offset`; StoreError if the file ends first."""
    bufs = [b.cast("B") for b in bufs if b.nbytes]
    total = sum(b.nbytes for b in bufs)
    pos = offset
    while bufs:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, bufs, pos)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, bufs[0].nbytes, pos)
            bufs[0][:len(data)] = data
            n = len(data)
        if n <= 0:
            raise StoreError(
                f"{path}: truncated: wanted {total} bytes at offset {offset}, file ended "
                f"at {pos}; {CONVERT_HINT}"
            )
        pos += n
        while bufs and n >= bufs[0].nbytes:
            n -= bufs[0].nbytes
            bufs.pop(0)
        if n:
            bufs[0] = bufs[0][n:]


class Store:
    """An opened, validated store. Use `Store.open(path)`; close() when done."""

    def __init__(self, path: Path, manifest: dict, config: dict, entries: dict):
        self.path = path
        self.manifest = manifest
        self.config = config
        self._entries = entries  # (layer, component) -> validated entry
        self._fds: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.moe_layers = sorted({k[0] for k in entries})
        self._ncomp = {l: sum(1 for k in entries if k[0] == l) for l in self.moe_layers}
        self.num_experts = next(iter(entries.values()))["num_blocks"] if entries else 0
        self._files = manifest["files"]
        self.io_mode = "random"  # see d2moe_mlx.system.IO_MODES

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open and validate the store at ``path`` (see :mod:`.validate`)."""
        root = Path(path)
        if not root.is_dir():
            raise StoreError(f"{root}: not a directory; point at a store made by `d2moe convert`")
        root = root.resolve()
        manifest, config, entries = validate_store(root)
        return cls(root, manifest, config, entries)

    # -- metadata ----------------------------------------------------------
    def _entry(self, layer: int, component: int) -> dict:
        try:
            return self._entries[(layer, component)]
        except KeyError:
            raise KeyError(f"no expert file for layer {layer} component {component} in "
                           f"{self.path} (MoE layers {self.moe_layers})") from None

    def num_components(self, layer: int) -> int:
        if layer not in self._ncomp:
            raise KeyError(f"layer {layer} is not an MoE layer of {self.path}")
        return self._ncomp[layer]

    def layout(self, layer: int, component: int) -> list[TensorSpec]:
        return list(self._entry(layer, component)["specs"])

    def block_bytes(self, layer: int, component: int) -> int:
        return self._entry(layer, component)["block_bytes"]

    def block_stride(self, layer: int, component: int) -> int:
        return self._entry(layer, component)["block_stride"]

    def expert_file(self, layer: int, component: int) -> Path:
        return self._entry(layer, component)["path"]

    def dense_files(self) -> list[Path]:
        return [self.path / n for n in self.manifest.get("dense_files", [])]

    def calib_stats(self) -> dict[str, np.ndarray] | None:
        if F.CALIB_STATS_NAME not in self._files:
            return None
        from safetensors.numpy import load_file

        return load_file(str(self.path / F.CALIB_STATS_NAME))

    # -- reading blocks ----------------------------------------------------
    def _fd(self, key: tuple[int, int]) -> int:
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    fd = open_for_expert_reads(self._entries[key]["path"], self.io_mode)
                    self._fds[key] = fd
        return fd

    def _locate(self, layer: int, component: int, expert: int) -> tuple[dict, int]:
        e = self._entry(layer, component)
        if not (type(expert) is int or isinstance(expert, np.integer)) or not 0 <= expert < e["num_blocks"]:
            raise IndexError(f"expert {expert} out of range 0..{e['num_blocks'] - 1}")
        return e, int(expert) * e["block_stride"]

    def _check_crc(self, e: dict, expert: int, off: int, crc: int,
                   hint: str = f"{CONVERT_HINT} (`d2moe inspect --verify` lists all damage)") -> None:
        if crc != e["crc32"][expert]:
            raise StoreError(
                f"{e['path']}: checksum mismatch in layer {e['layer']} component "
                f"{e['component']} expert {expert} (block at offset {off}); the file is "
                f"corrupted: {hint}"
            )

    def tensor_views(self, layer: int, component: int, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Views of each tensor inside a block buffer (no copy)."""
        return {s.name: buf[s.offset:s.offset + s.nbytes].view(s.np_dtype).reshape(s.shape)
                for s in self._entry(layer, component)["specs"]}

    def read_block_into(self, layer: int, component: int, expert: int, out: np.ndarray,
                        verify: bool = True) -> None:
        """Read one block into the first block_bytes bytes of `out`, a writable
        C-contiguous array (e.g. np.asarray of an evaluated MLX uint8 slot: zero copy)."""
        e, off = self._locate(layer, component, expert)
        bb = e["block_bytes"]
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
                and out.flags.writeable and out.nbytes >= bb):
            raise ValueError(f"out must be a writable C-contiguous numpy array of >= {bb} bytes")
        dst = out.reshape(-1).view(np.uint8)[:bb]
        _preadv_full(self._fd((layer, component)), [memoryview(dst)], off, e["path"])
        if verify:
            self._check_crc(e, int(expert), off, zlib.crc32(dst))

    def read_block_scattered(self, layer: int, component: int, expert: int,
                             bufs: list[np.ndarray], verify: bool = True) -> int:
        """Read one block with one preadv into ``bufs``: writable C-contiguous arrays
        whose sizes add up to block_bytes, filled in order (tensors straight into
        their destination, padding into scratch). Returns the bytes read.

        Errors name the file and the block: a short file, an I/O error, a checksum
        mismatch (when ``verify``)."""
        e, off = self._locate(layer, component, expert)
        views = [memoryview(b.reshape(-1).view(np.uint8)) for b in bufs]
        total = sum(v.nbytes for v in views)
        if total != e["block_bytes"]:
            raise ValueError(f"buffers hold {total} bytes, the block is {e['block_bytes']}")
        try:
            _preadv_full(self._fd((layer, component)), views, off, e["path"])
        except StoreError as err:
            raise StoreError(f"{err} (layer {layer} component {component} expert {expert})") from None
        except OSError as err:
            raise StoreError(
                f"{e['path']}: cannot read layer {layer} component {component} expert "
                f"{expert} (block at offset {off}): {err.strerror or err}") from err
        if verify:
            crc = 0
            for v in views:
                crc = zlib.crc32(v, crc)
            self._check_crc(e, int(expert), off, crc)
        release_pages(self._fd((layer, component)), off, total, self.io_mode)
        return total

    def read_block(self, layer: int, component: int, expert: int,
                   verify: bool = True) -> dict[str, np.ndarray]:
        """Read one expert's block into a fresh buffer; returns a view per tensor."""
        buf = np.empty(self.block_bytes(layer, component), dtype=np.uint8)
        self.read_block_into(layer, component, expert, buf, verify)
        return self.tensor_views(layer, component, buf)

    def read_expert_stack(self, layer: int, component: int, experts=None,
                          verify: bool = True) -> dict[str, np.ndarray]:
        """Stack every tensor over experts ([E, ...]), reading straight into the stacks."""
        e = self._entry(layer, component)
        ids = list(range(e["num_blocks"])) if experts is None else [int(x) for x in experts]
        specs = sorted(e["specs"], key=lambda s: s.offset)
        out = {s.name: np.empty((len(ids),) + s.shape, dtype=s.np_dtype) for s in specs}
        fd = self._fd((layer, component))
        for i, x in enumerate(ids):
            _, off = self._locate(layer, component, x)
            bufs, pos = [], 0
            for s in specs:
                if s.offset > pos:  # alignment padding: read it too, it is in the crc
                    bufs.append(memoryview(np.empty(s.offset - pos, np.uint8)))
                bufs.append(memoryview(out[s.name][i:i + 1].reshape(-1).view(np.uint8)))
                pos = s.offset + s.nbytes
            if e["block_bytes"] > pos:
                bufs.append(memoryview(np.empty(e["block_bytes"] - pos, np.uint8)))
            _preadv_full(fd, list(bufs), off, e["path"])
            if verify:
                crc = 0
                for b in bufs:
                    crc = zlib.crc32(b, crc)
                self._check_crc(e, x, off, crc)
        return {s.name: out[s.name] for s in e["specs"]}

    # -- integrity and summary ---------------------------------------------
    def verify(self, progress=None) -> list[str]:
        """Check every block and file checksum; returns problems (empty list = OK).

        progress(done_bytes, total_bytes) is called as bytes are checked.
        """
        from .writer import file_crc32

        total = sum(e["num_blocks"] * e["block_stride"] for e in self._entries.values())
        total += sum(i["size"] for i in self._files.values())
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        problems = []
        for key in sorted(self._entries):
            e = self._entries[key]
            buf = np.empty(e["block_stride"], dtype=np.uint8)
            for x in range(e["num_blocks"]):
                off = x * e["block_stride"]
                try:
                    _preadv_full(self._fd(key), [memoryview(buf)], off, e["path"])
                    self._check_crc(e, x, off, zlib.crc32(buf[:e["block_bytes"]]), CONVERT_HINT)
                    if buf[e["block_bytes"]:].any():
                        problems.append(f"{e['path']}: non-zero padding after block of expert "
                                        f"{x} (offset {off}); {CONVERT_HINT}")
                except (StoreError, OSError) as err:
                    problems.append(str(err))
                tick(e["block_stride"])
        for name, info in sorted(self._files.items()):
            p = self.path / name
            try:
                size, crc = file_crc32(p, tick)
            except OSError as err:
                problems.append(f"{p}: cannot read ({err})")
                continue
            if size != info["size"]:
                problems.append(f"{p}: size {size} != {info['size']} in the manifest; {CONVERT_HINT}")
            elif crc != info["crc32"]:
                problems.append(f"{p}: checksum mismatch (file corrupted); {CONVERT_HINT}")
        problems += self._check_dense_index()
        from .extras import read_extra

        for key in sorted(self.manifest.get("extras", {})):
            try:
                read_extra(self, key)
            except StoreError as err:
                problems.append(str(err))
        return problems

    def _check_dense_index(self) -> list[str]:
        dense = set(self.manifest.get("dense_files", []))
        if not dense:
            return []
        p = self.path / F.DENSE_INDEX_NAME
        try:
            idx = load_json(p, "dense index", F.MAX_JSON_FILE_BYTES)
        except StoreError as err:
            return [str(err)]
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            return [f"{p}: no 'weight_map' object; {CONVERT_HINT}"]
        stray = sorted({v for v in wm.values() if v not in dense}, key=str)
        return [f"{p}: weight_map points at {stray[:5]} not in dense_files; {CONVERT_HINT}"] if stray else []

    def summary(self) -> dict:
        """Sizes for `d2moe inspect`: bytes per component and per level, file counts."""
        comps: dict[int, dict] = {}
        for (layer, c), e in self._entries.items():
            d = comps.setdefault(c, {"layers": 0, "block_bytes": 0, "file_bytes": 0})
            d["layers"] += 1
            d["block_bytes"] += e["block_bytes"] * e["num_blocks"]
            d["file_bytes"] += e["block_stride"] * e["num_blocks"]
        levels, acc = {}, 0
        for c in sorted(comps):
            acc += comps[c]["block_bytes"]
            levels[c] = acc
        dense = sum(self._files[n]["size"] for n in self.manifest.get("dense_files", []))
        expert_files = sum(d["file_bytes"] for d in comps.values())
        other = sum(i["size"] for i in self._files.values())
        return {
            "path": str(self.path), "format": self.manifest["format"],
            "version": self.manifest["version"], "num_experts": self.num_experts,
            "moe_layers": len(self.moe_layers), "components": dict(sorted(comps.items())),
            "level_bytes": levels, "dense_bytes": dense, "expert_file_bytes": expert_files,
            "other_bytes": other - dense, "total_bytes": expert_files + other,
            "num_files": len(self._entries) + len(self._files) + 1,
        }

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
