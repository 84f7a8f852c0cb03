"""OS-specific memory and I/O settings for the streaming runtime.

Every platform branch lives here. The logic only touches the OS through a few
calls (``_platform()``, ``fcntl.fcntl``, ``os.posix_fadvise``, ``_libc()``,
``mx.metal.is_available``, ``mx.device_info``, ``mx.set_wired_limit``), so
tests can run the macOS paths on Linux by replacing just those.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
import warnings

import mlx.core as mx

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

IO_MODES = ("random", "nocache", "default")

# Darwin's fcntl commands, used when Python's fcntl lacks the names (e.g. on Linux).
_F_RDAHEAD = 45
_F_NOCACHE = 48
_MS_INVALIDATE = 2  # the same value in Darwin's and Linux's <sys/mman.h>
_MACH_TASK_BASIC_INFO = 20


def _platform() -> str:
    """``sys.platform`` (a seam for tests)."""
    return sys.platform


def _is_darwin() -> bool:
    return _platform() == "darwin"


def _check_mode(mode: str) -> None:
    if mode not in IO_MODES:
        raise ValueError(f"unknown I/O mode {mode!r}; use one of {', '.join(IO_MODES)}")


def _fcntl_best_effort(fd: int, name: str, default: int, arg: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.fcntl(fd, getattr(fcntl, name, default), arg)
    except OSError:
        pass


def _fadvise_best_effort(fd: int, offset: int, length: int, advice_name: str) -> None:
    advice = getattr(os, advice_name, None)
    if advice is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass


def open_for_expert_reads(path: str | os.PathLike, mode: str = "random") -> int:
    """Open ``path`` read-only for random expert-block reads; returns the fd.

    ``random``: no kernel readahead (Linux POSIX_FADV_RANDOM, macOS F_RDAHEAD 0).
    ``nocache``: also keep the bytes out of the page cache (macOS F_NOCACHE 1;
    on Linux FADV_RANDOM here and ``release_pages`` after each read).
    ``default``: the OS defaults. Advice failures are ignored (best effort).
    """
    _check_mode(mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    if mode == "default":
        return fd
    if _is_darwin():
        _fcntl_best_effort(fd, "F_RDAHEAD", _F_RDAHEAD, 0)
        if mode == "nocache":
            _fcntl_best_effort(fd, "F_NOCACHE", _F_NOCACHE, 1)
    else:
        _fadvise_best_effort(fd, 0, 0, "POSIX_FADV_RANDOM")
    return fd


def release_pages(fd: int, offset: int, length: int, mode: str) -> None:
    """After a read in ``nocache`` mode on Linux, drop that range from the page
    cache (POSIX_FADV_DONTNEED). Otherwise nothing (macOS F_NOCACHE already
    bypasses the cache)."""
    _check_mode(mode)
    if mode == "nocache" and _platform().startswith("linux"):
        _fadvise_best_effort(fd, offset, length, "POSIX_FADV_DONTNEED")


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """The C library with the prototypes we call (a seam for tests)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int64]
    libc.msync.restype = ctypes.c_int
    libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    if hasattr(libc, "mach_task_self"):  # macOS only
        libc.mach_task_self.restype = ctypes.c_uint32
    return libc


def _msync_invalidate(fd: int, size: int) -> bool:
    """mmap(PROT_READ, MAP_SHARED) + msync(MS_INVALIDATE) + munmap; True if msync succeeded."""
    libc = _libc()
    addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED (1 on Darwin and Linux)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return False
    try:
        return libc.msync(addr, size, _MS_INVALIDATE) == 0
    finally:
        libc.munmap(addr, size)


def drop_file_cache(path: str | os.PathLike) -> bool:
    """Make ``path`` cold (evict its pages from the page cache) for benchmarks.

    Linux: fsync, then POSIX_FADV_DONTNEED over the whole file (pages mapped by
    a process stay). macOS has no per-file eviction call and ``purge`` is
    system-wide and needs root; the best unprivileged option (the one
    Chromium's test utilities use) is mmap(MAP_SHARED) + msync(MS_INVALIDATE),
    which asks the unified buffer cache to drop the file's pages. True means the
    kernel accepted the request; it does not prove that every page left.
    Returns False, without raising, when the file cannot be opened or the OS
    offers no way.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
        except OSError:
            pass
        if _is_darwin():
            size = os.fstat(fd).st_size
            return True if size == 0 else _msync_invalidate(fd, size)
        if not hasattr(os, "posix_fadvise"):
            return False
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def _metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except AttributeError:
        return False


def _gpu_device_info() -> dict:
    """The GPU's device_info (``mx.device_info``; ``mx.metal.device_info`` on old MLX)."""
    if hasattr(mx, "device_info"):
        return dict(mx.device_info(mx.gpu))
    return dict(mx.metal.device_info())


# glibc's mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Make freed large allocations go back to the OS (glibc; elsewhere a no-op, False).

    glibc raises its mmap threshold after a large block is freed (up to 32 MiB), so
    later large temporaries (MLX buffers past its cache limit, the loader's packing)
    come from heap arenas that are not given back: RSS stays at the high-water mark.
    A fixed 1 MiB threshold keeps them on mmap. Measured on this project's synthetic
    store (4 layers, 64 experts, 25% cache, 1100-token prompt, CPU): peak RSS 600.7 ->
    563.7 MiB. Process-wide, so it is set only for a model loaded with a budget and
    for a conversion (the converter's peak grew with its layers without it)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD))


def trim_heap() -> bool:
    """Give the free pages inside malloc's arenas back to the OS (glibc's
    ``malloc_trim(0)``); True where that exists, elsewhere a no-op and False.

    For a loop whose steps each allocate and free hundreds of MiB from several threads
    (the converter's layers): the mmap threshold of :func:`return_freed_memory` keeps
    large blocks off the heap, but the smaller ones still fragment the per-thread
    arenas, and without a trim the peak RSS crept up by tens of MiB a step."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _glibc(name: str):
    """glibc's function ``name`` (None off Linux, or where libc is not glibc: musl)."""
    if _platform() != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return getattr(libc, name, None)


def set_wired_limit(budget_bytes: int) -> int | None:
    """Keep up to ``budget_bytes`` of MLX memory wired (resident) on Metal.

    The budget is clamped to the device's ``max_recommended_working_set_size``
    (with a warning; raise it with ``sudo sysctl iogpu.wired_limit_mb=...``).
    Returns the previous limit, for ``restore_wired_limit``. On CPU and CUDA
    this does nothing and returns None.
    """
    budget = int(budget_bytes)
    if budget < 0:
        raise ValueError(f"wired limit must not be negative, got {budget}")
    if not _metal_available():
        return None
    cap = _gpu_device_info().get("max_recommended_working_set_size")
    limit = budget
    if cap and budget > int(cap):
        limit = int(cap)
        warnings.warn(
            f"wired limit {budget} bytes exceeds this device's max recommended working set "
            f"({limit} bytes); using {limit}. Raise it with `sudo sysctl iogpu.wired_limit_mb=N`",
            stacklevel=2,
        )
    return int(mx.set_wired_limit(limit))


def restore_wired_limit(previous: int | None) -> None:
    """Undo ``set_wired_limit`` (``previous`` is what it returned; None: nothing)."""
    if previous is not None and _metal_available():
        mx.set_wired_limit(int(previous))


class _MachTaskBasicInfo(ctypes.Structure):
    _pack_ = 4  # <mach/task_info.h> packs these structs to 4 bytes
    _fields_ = [
        ("virtual_size", ctypes.c_uint64),
        ("resident_size", ctypes.c_uint64),
        ("resident_size_max", ctypes.c_uint64),
        ("user_time", ctypes.c_int32 * 2),  # time_value_t: seconds, microseconds
        ("system_time", ctypes.c_int32 * 2),
        ("policy", ctypes.c_int32),
        ("suspend_count", ctypes.c_int32),
    ]


def _mach_resident_bytes() -> int:
    """resident_size of task_info(mach_task_self(), MACH_TASK_BASIC_INFO)."""
    libc = _libc()
    info = _MachTaskBasicInfo()
    count = ctypes.c_uint32(ctypes.sizeof(info) // 4)  # MACH_TASK_BASIC_INFO_COUNT = 12
    kr = libc.task_info(libc.mach_task_self(), _MACH_TASK_BASIC_INFO, ctypes.byref(info),
                        ctypes.byref(count))
    if kr != 0:
        raise OSError(f"task_info failed (kern_return_t {kr})")
    return int(info.resident_size)


def _peak_rss_fallback() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if _is_darwin() else peak * 1024)  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    """The process's current resident set size in bytes (not the peak).

    Linux: /proc/self/statm. macOS: mach task_info resident_size. If those
    fail, the peak (``ru_maxrss``), an upper bound.
    """
    if _is_darwin():
        try:
            return _mach_resident_bytes()
        except (OSError, AttributeError, ValueError):
            return _peak_rss_fallback()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_fallback()
