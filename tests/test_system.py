"""d2moe_mlx.system: real behaviour on this OS, and the macOS/Metal logic with
only the syscall boundary replaced."""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest

from d2moe_mlx import system

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux behaviour")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "experts.bin"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    p.write_bytes(data.tobytes())
    return p, data


@pytest.fixture
def calls(monkeypatch):
    """Record fcntl.fcntl and os.posix_fadvise calls instead of making them."""
    rec = []
    monkeypatch.setattr(system.fcntl, "fcntl", lambda fd, cmd, arg: rec.append(("fcntl", fd, cmd, arg)))
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, adv: rec.append(("fadvise", fd, off, n, adv)), raising=False)
    return rec


def as_darwin(monkeypatch):
    monkeypatch.setattr(system, "_platform", lambda: "darwin")


# -- real behaviour ------------------------------------------------------------------
@pytest.mark.parametrize("mode", system.IO_MODES)
def test_open_for_expert_reads_gives_readable_fd(data_file, mode):
    path, data = data_file
    fd = system.open_for_expert_reads(path, mode)
    try:
        buf = np.empty(3 << 14, np.uint8)
        assert os.preadv(fd, [memoryview(buf)], 1 << 16) == buf.nbytes
        np.testing.assert_array_equal(buf, data[1 << 16:(1 << 16) + buf.nbytes])
        system.release_pages(fd, 1 << 16, buf.nbytes, mode)
        assert os.pread(fd, 4, 0) == data[:4].tobytes()
        if hasattr(os, "O_CLOEXEC"):
            assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad", ["Random", "direct", ""])
def test_bad_mode_names_the_modes(data_file, bad):
    path, _ = data_file
    for call in (lambda: system.open_for_expert_reads(path, bad),
                 lambda: system.release_pages(0, 0, 1, bad)):
        with pytest.raises(ValueError) as err:
            call()
        for m in system.IO_MODES:
            assert m in str(err.value)


def test_drop_file_cache_real(data_file, tmp_path):
    path, data = data_file
    assert system.drop_file_cache(path) is True
    assert path.read_bytes() == data.tobytes()  # still intact
    assert system.drop_file_cache(tmp_path / "missing") is False


@linux_only
def test_linux_advice_calls(data_file, calls):
    path, _ = data_file
    for mode in ("random", "nocache"):
        fd = system.open_for_expert_reads(path, mode)
        system.release_pages(fd, 4096, 8192, mode)
        os.close(fd)
    fd = system.open_for_expert_reads(path, "default")
    system.release_pages(fd, 0, 10, "default")
    os.close(fd)
    assert [c[0] for c in calls] == ["fadvise", "fadvise", "fadvise"]  # no fcntl on Linux
    assert calls[0][2:] == (0, 0, os.POSIX_FADV_RANDOM)
    assert calls[1][2:] == (0, 0, os.POSIX_FADV_RANDOM)
    assert calls[2][2:] == (4096, 8192, os.POSIX_FADV_DONTNEED)  # only nocache releases
    calls.clear()
    assert system.drop_file_cache(path)
    assert [c[2:] for c in calls] == [(0, 0, os.POSIX_FADV_DONTNEED)]


_RSS_PROBE = """
import numpy as np
from d2moe_mlx import system
n = 64 << 20
before = system.current_rss_bytes()
a = np.empty(n, np.uint8)
a[::4096] = 1  # touch every page
grown = system.current_rss_bytes() - before
del a
print(n, grown, system.current_rss_bytes() - before)
"""


@linux_only
def test_current_rss_tracks_touched_memory():
    # A fresh interpreter: in the test process, memory freed by earlier tests (and
    # threads they leave running) can be reused or allocated between the readings.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, check=True)
    n, grown, after_del = (int(v) for v in out.stdout.split())
    assert 0.85 * n < grown < 1.25 * n, grown
    assert after_del < 0.25 * n  # current, not peak


# -- macOS logic, syscalls mocked ----------------------------------------------------
def test_darwin_random_and_nocache_fcntl(data_file, calls, monkeypatch):
    path, _ = data_file
    as_darwin(monkeypatch)
    monkeypatch.delattr(system.fcntl, "F_RDAHEAD", raising=False)
    monkeypatch.delattr(system.fcntl, "F_NOCACHE", raising=False)
    got = {}
    for mode in system.IO_MODES:
        calls.clear()
        fd = system.open_for_expert_reads(path, mode)
        system.release_pages(fd, 0, 4096, mode)
        os.close(fd)
        got[mode] = [(c[0],) + c[2:] for c in calls]
        assert all(c[1] == fd for c in calls)
    assert got["random"] == [("fcntl", 45, 0)]  # F_RDAHEAD 0
    assert got["nocache"] == [("fcntl", 45, 0), ("fcntl", 48, 1)]  # + F_NOCACHE 1
    assert got["default"] == []  # and never posix_fadvise on macOS


def test_darwin_fcntl_oserror_swallowed(data_file, monkeypatch):
    path, _ = data_file
    as_darwin(monkeypatch)
    tried = []

    def failing(fd, cmd, arg):
        tried.append((cmd, arg))
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(system.fcntl, "fcntl", failing)
    fd = system.open_for_expert_reads(path, "nocache")
    try:
        assert os.pread(fd, 8, 0) == path.read_bytes()[:8]
    finally:
        os.close(fd)
    assert [a for _, a in tried] == [0, 1]  # both tried despite the first failing


def test_darwin_drop_file_cache_uses_msync_invalidate(data_file, calls, monkeypatch):
    path, data = data_file
    as_darwin(monkeypatch)
    assert system.drop_file_cache(path) is True  # real mmap + msync(MS_INVALIDATE) here
    assert calls == []  # no posix_fadvise on macOS
    assert path.read_bytes() == data.tobytes()

    rec = []

    class FakeLibc:
        def mmap(self, addr, size, prot, flags, fd, off):
            rec.append(("mmap", size, prot, flags, off))
            return 0x10000

        def msync(self, addr, size, flags):
            rec.append(("msync", addr, size, flags))
            return -1

        def munmap(self, addr, size):
            rec.append(("munmap", addr, size))
            return 0

    monkeypatch.setattr(system, "_libc", FakeLibc)
    assert system.drop_file_cache(path) is False  # failure reported, no exception
    n = data.nbytes
    assert rec == [("mmap", n, 1, 1, 0), ("msync", 0x10000, n, 2), ("munmap", 0x10000, n)]
    rec.clear()
    FakeLibc.mmap = lambda self, *a: ctypes.c_void_p(-1).value  # MAP_FAILED
    assert system.drop_file_cache(path) is False and rec == []


def test_darwin_rss_from_mach_task_info(monkeypatch):
    as_darwin(monkeypatch)
    seen = []

    class FakeLibc:
        def mach_task_self(self):
            return 259

        def task_info(self, task, flavor, info_ref, count_ref):
            seen.append((task, flavor, count_ref._obj.value))
            info_ref._obj.resident_size = 123 << 20
            info_ref._obj.resident_size_max = 999 << 20
            return 0

    monkeypatch.setattr(system, "_libc", FakeLibc)
    assert system.current_rss_bytes() == 123 << 20
    assert seen == [(259, 20, 12)]  # MACH_TASK_BASIC_INFO, MACH_TASK_BASIC_INFO_COUNT

    FakeLibc.task_info = lambda self, *a: 5  # KERN_FAILURE: fall back to ru_maxrss (bytes)

    class Usage:
        ru_maxrss = 777 << 20

    monkeypatch.setattr(system.resource, "getrusage", lambda who: Usage)
    assert system.current_rss_bytes() == 777 << 20


@pytest.fixture
def metal(monkeypatch):
    rec = {"set": []}

    def fake_set(limit):
        rec["set"].append(limit)
        return 4 << 30

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda d=None: {"max_recommended_working_set_size": 48 << 30,
                                                           "memory_size": 64 << 30})
    monkeypatch.setattr(mx, "set_wired_limit", fake_set)
    return rec


def test_wired_limit_within_cap(metal):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert system.set_wired_limit(20 << 30) == 4 << 30
    system.restore_wired_limit(4 << 30)
    system.restore_wired_limit(None)
    assert metal["set"] == [20 << 30, 4 << 30]


def test_wired_limit_clamped_with_warning(metal):
    with pytest.warns(UserWarning, match="max recommended working set"):
        prev = system.set_wired_limit(100 << 30)
    assert prev == 4 << 30
    assert metal["set"] == [48 << 30]
    with pytest.raises(ValueError):
        system.set_wired_limit(-1)


def test_wired_limit_noop_without_metal(monkeypatch):
    rec = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", lambda v: rec.append(v) or 0)
    assert system.set_wired_limit(8 << 30) is None
    system.restore_wired_limit(1 << 30)
    assert rec == []
