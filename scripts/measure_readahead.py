"""Cold random expert-block reads per I/O mode, and the disk's sequential GB/s.

Reads the way the runtime does: one os.preadv of a block into a preallocated
numpy buffer, one read at a time, at 16 KiB-aligned offsets (distinct random
blocks of a store-like layout: block i at i * stride), the same blocks for
every mode, the file made cold (system.drop_file_cache) before each mode. Modes:

  default  buffered, kernel readahead on
  random   POSIX_FADV_RANDOM (macOS: F_RDAHEAD 0)
  nocache  random + drop each block from the page cache after reading it
           (macOS: F_NOCACHE)
  odirect  Linux O_DIRECT into a 4096-aligned staging buffer, then a copy into
           the destination: MLX slot memory is not page-aligned (np.asarray of
           an evaluated MLX array starts 24 bytes into a page here), so O_DIRECT
           cannot read straight into a slot.

"useful" GB/s counts the requested bytes (GB = 1e9 bytes). "amp" is bytes the
device delivered / useful bytes: read_bytes of /proc/self/io (this process),
and pgpgin of /proc/vmstat (whole system, so other processes add noise).

    python scripts/measure_readahead.py --dir /tmp --size-gb 2 --block-mb 3 --reads 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import numpy as np

from d2moe_mlx.system import drop_file_cache, open_for_expert_reads, release_pages

ALIGN = 16 << 10  # expert blocks start at 16 KiB boundaries in the store
DIRECT_ALIGN = 4096
CHUNK = 64 << 20


def io_counters() -> dict[str, int | None]:
    """Bytes read from storage so far: this process (/proc/self/io) and the system (vmstat)."""
    out: dict[str, int | None] = {"io": None, "vmstat": None}
    try:
        with open("/proc/self/io") as f:
            out["io"] = next(int(ln.split()[1]) for ln in f if ln.startswith("read_bytes:"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/vmstat") as f:
            out["vmstat"] = next(int(ln.split()[1]) for ln in f if ln.startswith("pgpgin ")) * 1024
    except (OSError, StopIteration):
        pass
    return out


def readahead_kb(path: str) -> int | None:
    """read_ahead_kb of the block device holding `path` (Linux), else None."""
    dev = os.stat(path).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in ("queue/read_ahead_kb", "../queue/read_ahead_kb", "bdi/read_ahead_kb"):
        try:
            with open(os.path.join(base, q)) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def make_file(path: str, size: int, seed: int) -> None:
    """`size` bytes of incompressible data, written and fsynced."""
    chunk = np.frombuffer(np.random.default_rng(seed).bytes(min(CHUNK, size)), np.uint8)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, chunk.nbytes)
            f.write(memoryview(chunk[:n]))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def pread_full(fd: int, buf: np.ndarray, offset: int) -> None:
    view, pos = memoryview(buf).cast("B"), offset
    while view.nbytes:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise OSError(f"file ended at {pos}")
        view, pos = view[n:], pos + n


def measure(path: str, run, useful: int) -> dict:
    """Make `path` cold, run `run()`, and return GB/s and amplification."""
    cold = drop_file_cache(path)
    before = io_counters()
    t0 = time.perf_counter()
    run()
    secs = time.perf_counter() - t0
    after = io_counters()
    res = {"seconds": secs, "useful_bytes": useful, "gbps": useful / secs / 1e9, "cold": cold}
    for k in ("io", "vmstat"):
        dev = None if before[k] is None or after[k] is None else after[k] - before[k]
        res[f"device_bytes_{k}"] = dev
        res[f"amp_{k}"] = None if dev is None else dev / useful
    return res


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats (and the GB/s range); an error if a run failed."""
    if "error" in runs[-1]:
        return runs[-1]
    out = {k: float(np.median([r[k] for r in runs])) for k in ("gbps", "seconds")}
    for k in ("amp_io", "amp_vmstat"):
        vals = [r[k] for r in runs]
        out[k] = None if None in vals else float(np.median(vals))
    out.update(gbps_min=min(r["gbps"] for r in runs), gbps_max=max(r["gbps"] for r in runs),
               cold=all(r["cold"] for r in runs), useful_bytes=runs[0]["useful_bytes"], runs=runs)
    return out


def random_reads(path: str, mode: str, offsets: list[int], block: int) -> None:
    dst = np.empty(block, np.uint8)  # the "slot" the runtime reads into
    if mode == "odirect":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        n = -(-block // DIRECT_ALIGN) * DIRECT_ALIGN
        raw = np.empty(n + DIRECT_ALIGN, np.uint8)
        pad = (-raw.ctypes.data) % DIRECT_ALIGN
        stage = raw[pad:pad + n]
    else:
        fd = open_for_expert_reads(path, mode)
    try:
        for off in offsets:
            if mode == "odirect":
                pread_full(fd, stage, off)
                dst[:] = stage[:block]
            else:
                pread_full(fd, dst, off)
                release_pages(fd, off, block, mode)
    finally:
        os.close(fd)


def sequential_read(path: str, size: int) -> None:
    buf = np.empty(8 << 20, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, buf.nbytes):
            pread_full(fd, buf[:min(buf.nbytes, size - off)], off)
    finally:
        os.close(fd)


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp", help="directory for the temporary file")
    ap.add_argument("--size-gb", type=float, default=2.0, help="file size in GiB")
    ap.add_argument("--block-mb", type=float, default=3.0, help="block size in MiB")
    ap.add_argument("--reads", type=int, default=256, help="random block reads per mode")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all modes; medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.reads < 1 or args.repeat < 1:
        ap.error("--reads and --repeat must be at least 1")

    size = int(args.size_gb * (1 << 30)) // ALIGN * ALIGN
    block = int(args.block_mb * (1 << 20))
    span = -(-block // DIRECT_ALIGN) * DIRECT_ALIGN
    if size < span + ALIGN:
        ap.error("--size-gb must be larger than a block")
    # distinct blocks of a store-like layout: block i at i * stride, stride 16 KiB-aligned
    stride = -(-span // ALIGN) * ALIGN
    slots = (size - span) // stride + 1
    if args.reads > slots:
        print(f"--reads {args.reads} > {slots} blocks in the file: some blocks repeat "
              f"(and may hit the page cache)", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(slots, args.reads, replace=args.reads > slots)
    offsets = [int(x) * stride for x in picks]
    modes = ["default", "random", "nocache"] + (["odirect"] if hasattr(os, "O_DIRECT") else [])

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    fd, path = tempfile.mkstemp(prefix="d2moe_readahead_", suffix=".bin", dir=args.dir)
    os.close(fd)
    results: dict = {"dir": args.dir, "file_bytes": size, "block_bytes": block,
                     "reads": args.reads, "read_ahead_kb": readahead_kb(path), "modes": {}}
    try:
        print(f"writing {size / 2**30:.2f} GiB to {path} ...", file=sys.stderr)
        make_file(path, size, args.seed)
        jobs = {"sequential": (lambda: sequential_read(path, size), size)}
        for mode in modes:
            jobs[mode] = (lambda m=mode: random_reads(path, m, offsets, block), block * args.reads)
        runs: dict[str, list] = {name: [] for name in jobs}
        for rep in range(args.repeat):  # modes in a rotated order each round
            names = list(jobs)[rep % len(jobs):] + list(jobs)[:rep % len(jobs)]
            for name in names:
                if runs[name] and "error" in runs[name][-1]:
                    continue
                try:
                    runs[name].append(measure(path, *jobs[name]))
                except OSError as err:  # e.g. O_DIRECT on tmpfs
                    runs[name].append({"error": str(err)})
        for name, rs in runs.items():
            results["modes"][name] = summarize(rs)
        results["sequential"] = results["modes"].pop("sequential")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        os.unlink(path)

    print(f"{args.reads} cold random reads of distinct {block / 2**20:g} MiB blocks (16 KiB-aligned) of a "
          f"{size / 2**30:g} GiB file in {args.dir} (read_ahead_kb {results['read_ahead_kb']})")
    print(f"median of {args.repeat}; GB = 1e9 bytes of useful data per second")
    print(f"{'mode':<11}{'GB/s':>7}{'min-max':>12}{'amp io':>9}{'amp vmstat':>12}  cold")
    for name, r in [("sequential", results["sequential"]), *results["modes"].items()]:
        if "error" in r:
            print(f"{name:<11}  error: {r['error']}")
            continue
        span_txt = f"{r['gbps_min']:.2f}-{r['gbps_max']:.2f}"
        print(f"{name:<11}{r['gbps']:>7.2f}{span_txt:>12}{fmt(r['amp_io'], '.2f'):>9}"
              f"{fmt(r['amp_vmstat'], '.2f'):>12}  {r['cold']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
