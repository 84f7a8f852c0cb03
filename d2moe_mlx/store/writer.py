"""Atomic writer of a d2moe expert store (see docs/FORMAT.md).

Everything goes into a temporary sibling directory `<out>.d2moe-tmp-<pid>-<hex>`;
`finalize()` writes d2moe.json last, fsyncs, and renames the directory into
place, so an interrupted run never leaves a loadable store at `out`. With
`overwrite=True` only an empty directory or one of our stores is replaced
(`check_out_dir`); nothing else is ever deleted.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import secrets
import shutil
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from .format import (
    BLOCK_ALIGN, CALIB_STATS_NAME, CHECKSUM, CONFIG_NAME, DENSE_INDEX_NAME, EXPERTS_DIR,
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, MANIFEST_PARTIAL_NAME, MAX_NAME_LEN,
    TENSOR_ALIGN, as_numpy, block_layout, dense_shard_name, expert_file_name,
    partial_shard_name, round_up,
)
from .outdir import check_out_dir

TMP_TAG = ".d2moe-tmp-"
OLD_TAG = ".d2moe-old-"
RESERVED_KEYS = ("format", "version", "created", "experts", "files", "dense_files")
_CHUNK = 8 << 20


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def file_crc32(path: Path, progress=None) -> tuple[int, int]:
    """(size, crc32) of a whole file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return size, crc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(out_dir: str | Path) -> list[Path]:
    """Remove `<out>.d2moe-tmp-*` / `<out>.d2moe-old-*` siblings of dead writers.

    A temp dir is named after its writer's pid; directories of live processes
    (other than this one, which never calls this with a live temp dir) are kept.
    """
    out = Path(out_dir)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        for tag in (TMP_TAG, OLD_TAG):
            if not p.name.startswith(out.name + tag):
                continue
            pid_s = p.name[len(out.name + tag):].split("-", 1)[0]
            pid = int(pid_s) if pid_s.isdigit() else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _check_name(name: str) -> str:
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name
            or "\x00" in name or name in (".", "..") or len(name) > MAX_NAME_LEN):
        raise ValueError(f"{name!r} is not a plain file name")
    if (name in (MANIFEST_NAME, EXPERTS_DIR, DENSE_INDEX_NAME, CALIB_STATS_NAME)
            or name.startswith(("dense-", "model-", "partial-"))):
        raise ValueError(f"{name!r} is reserved by the store format")
    return name


class StoreWriter:
    """Write a store into a temp dir, then `finalize(manifest)` it into `out_dir`."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_out_dir(self.out_dir, overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(self.out_dir)
        name = f"{self.out_dir.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp = self.out_dir.parent / name
        self._tmp.mkdir()
        (self._tmp / EXPERTS_DIR).mkdir()
        self._experts: dict[tuple[int, int], dict] = {}
        self._shards: list[tuple[str, list[str]]] = []  # (partial name, weight names)
        self._weight_names: set[str] = set()
        self._done = False

    @property
    def tmp_dir(self) -> Path:
        return self._tmp

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this StoreWriter is finalized or aborted")

    # -- experts ---------------------------------------------------------
    def write_expert_file(self, layer: int, component: int, blocks: Iterable[dict]) -> None:
        """Write one expert file: block e holds expert e's tensors of this component.

        `blocks` may be a list or any iterable (e.g. a generator quantizing one expert
        at a time): blocks are written as they come, never concatenated in memory.
        """
        self._check_open()
        layer, component = int(layer), int(component)
        if layer < 0 or component < 0:
            raise ValueError("layer and component must be >= 0")
        if (layer, component) in self._experts:
            raise ValueError(f"expert file of layer {layer} component {component} written twice")
        it = iter(blocks)
        first = next(it, None)
        if first is None:
            raise ValueError("need at least one expert block")
        specs, block_bytes = block_layout(first)
        name = expert_file_name(layer, component)
        try:
            with open(self._tmp / name, "wb") as f:
                crcs, stride = self._write_blocks(f, itertools.chain([first], it), specs,
                                                  block_bytes, f"layer {layer} component {component}")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            (self._tmp / name).unlink(missing_ok=True)
            raise
        self._experts[(layer, component)] = {
            "layer": layer, "component": component, "file": name,
            "num_blocks": len(crcs), "block_bytes": block_bytes, "block_stride": stride,
            "tensors": [s.to_json() for s in specs], "crc32": crcs,
        }

    @staticmethod
    def _write_blocks(f, blocks, specs, block_bytes: int, where: str) -> tuple[list[int], int]:
        stride = round_up(max(block_bytes, 1), BLOCK_ALIGN)
        want = {s.name: (s.dtype, s.shape) for s in specs}
        view = memoryview(bytearray(stride))  # padding bytes are never written: stay zero
        crcs = []
        for e, block in enumerate(blocks):
            arrays = {k: as_numpy(v) for k, v in block.items()}
            got = {k: (dt, tuple(a.shape)) for k, (a, dt) in arrays.items()}
            if got != want:
                raise ValueError(f"block {e} of {where} has tensors {got}, block 0 has "
                                 f"{want}: all experts must share one layout")
            for s in specs:
                view[s.offset:s.offset + s.nbytes] = arrays[s.name][0].reshape(-1).view(np.uint8)
            crcs.append(zlib.crc32(view[:block_bytes]))
            f.write(view)
        return crcs, stride

    # -- dense weights, calibration stats, misc files ---------------------
    def write_dense_shard(self, weights: dict) -> None:
        """Append one safetensors shard of non-expert weights (mlx-lm names)."""
        self._check_open()
        import mlx.core as mx

        dup = self._weight_names.intersection(weights)
        if dup:
            raise ValueError(f"dense weights written twice: {sorted(dup)[:5]}")
        arrays = {k: v if isinstance(v, mx.array) else mx.array(np.asarray(v))
                  for k, v in weights.items()}
        partial = partial_shard_name(len(self._shards))
        mx.save_safetensors(str(self._tmp / partial), arrays, metadata={"format": "mlx"})
        self._weight_names.update(arrays)
        self._shards.append((partial, sorted(arrays)))

    def write_calib_stats(self, arrays: dict[str, np.ndarray]) -> None:
        """Write calib_stats.safetensors (numpy arrays, e.g. counts and mean gate scores)."""
        self._check_open()
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                  str(self._tmp / CALIB_STATS_NAME), metadata={"format": "np"})

    def copy_file(self, src: str | Path, name: str) -> None:
        """Copy a file (config, tokenizer files) verbatim into the store root."""
        self._check_open()
        shutil.copyfile(src, self._tmp / _check_name(name))

    def write_json(self, name: str, obj) -> None:
        """Write a JSON file (e.g. the normalised config.json) into the store root."""
        self._check_open()
        with open(self._tmp / _check_name(name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    # -- finish ----------------------------------------------------------
    def abort(self) -> None:
        """Remove the temp directory; nothing appears at out_dir."""
        self._done = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _finish_dense(self) -> list[str]:
        n = len(self._shards)
        names, weight_map, total = [], {}, 0
        for i, (partial, keys) in enumerate(self._shards):
            final = dense_shard_name(i + 1, n)
            os.replace(self._tmp / partial, self._tmp / final)
            total += (self._tmp / final).stat().st_size
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(self._tmp / DENSE_INDEX_NAME, "w") as f:
                json.dump(index, f, indent=4)
        return names

    def _expert_section(self) -> dict:
        layers: dict[int, list[int]] = {}
        for layer, comp in self._experts:
            layers.setdefault(layer, []).append(comp)
        for layer, comps in layers.items():
            if sorted(comps) != list(range(len(comps))):
                raise ValueError(f"layer {layer} has components {sorted(comps)}; need 0..n-1")
        counts = {e["num_blocks"] for e in self._experts.values()}
        if len(counts) > 1:
            raise ValueError(f"expert files disagree on the number of experts: {sorted(counts)}")
        files = [self._experts[k] for k in sorted(self._experts)]
        return {"block_align": BLOCK_ALIGN, "tensor_align": TENSOR_ALIGN,
                "checksum": CHECKSUM, "files": files}

    def finalize(self, manifest: dict) -> Path:
        """Write d2moe.json last, fsync, and rename the temp dir to out_dir atomically."""
        self._check_open()
        bad = [k for k in RESERVED_KEYS if k in manifest]
        if bad:
            raise ValueError(f"manifest keys {bad} are set by StoreWriter itself")
        if not (self._tmp / CONFIG_NAME).is_file():
            raise ValueError(f"write {CONFIG_NAME} (write_json or copy_file) before finalize()")
        try:
            experts = self._expert_section()
            dense = self._finish_dense()
            files = {}
            for p in sorted(self._tmp.iterdir()):
                if p.is_file() and p.name != MANIFEST_NAME:
                    size, crc = file_crc32(p)
                    files[p.name] = {"size": size, "crc32": crc}
                    _fsync_path(p)
            doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   **manifest, "experts": experts, "files": files, "dense_files": dense}
            tmp_manifest = self._tmp / MANIFEST_PARTIAL_NAME
            with open(tmp_manifest, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_manifest, self._tmp / MANIFEST_NAME)
            _fsync_path(self._tmp / EXPERTS_DIR, directory=True)
            _fsync_path(self._tmp, directory=True)

            from .reader import Store  # self-check: the result must open

            Store.open(self._tmp).close()
            self._install()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def _install(self) -> None:
        out, parent = self.out_dir, self.out_dir.parent
        old = None
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise FileExistsError(f"{out} appeared while converting; nothing was replaced")
            check_out_dir(out, overwrite=True)  # again: it may have changed meanwhile
            old = parent / f"{out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
        os.rename(self._tmp, out)
        _fsync_path(parent, directory=True)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
