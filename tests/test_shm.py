"""Sealed shared-memory segments (bigmachine._shm), without sockets: what a sender
makes, what a receiver accepts and maps, when a mapping can be passed on."""
from __future__ import annotations

import fcntl
import gc
import mmap
import os

import numpy as np
import pytest

import bigmachine as bm
from bigmachine import _arena, _shm

pytestmark = pytest.mark.skipif(not _shm.AVAILABLE, reason="memfd sealing is Linux's")


def open_fds() -> int:
    """Our open segment descriptors (other tests of this process may open and close others)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:bigmachine-array")
        except OSError:
            pass
    return count


def memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("bigmachine-array" in line for line in f)


def received(a: np.ndarray) -> tuple[int, np.ndarray]:
    """What a receiver gets for a: (the sender's fd, the receiver's array)."""
    fd = _shm.create(memoryview(a))
    mine = os.dup(fd)  # what SCM_RIGHTS would hand the receiver
    _shm.check(mine, a.nbytes)
    return fd, np.frombuffer(_shm.map_segment(mine, a.nbytes), dtype=a.dtype).reshape(a.shape)


def test_a_segment_is_sealed_against_every_change():
    a = np.arange(1 << 18, dtype=np.float64)
    fd = _shm.create(memoryview(a))
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & _shm.REQUIRED_SEALS == _shm.REQUIRED_SEALS
        for change in (lambda: os.pwrite(fd, b"x", 0), lambda: os.ftruncate(fd, 8),
                       lambda: os.ftruncate(fd, a.nbytes * 2),
                       lambda: mmap.mmap(fd, a.nbytes, flags=mmap.MAP_SHARED,
                                         prot=mmap.PROT_READ | mmap.PROT_WRITE),
                       lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)):
            with pytest.raises(PermissionError):
                change()
        assert os.fstat(fd).st_size == a.nbytes
    finally:
        os.close(fd)


def test_an_unsealed_or_mis_sized_segment_is_refused():
    plain = os.memfd_create("plain", os.MFD_CLOEXEC)
    os.ftruncate(plain, 4096)
    sealable = os.memfd_create("half", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(sealable, 4096)
    fcntl.fcntl(sealable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # it could still shrink
    r, w = os.pipe()
    good = _shm.create(memoryview(np.zeros(512)))
    try:
        for fd, size, why in ((plain, 4096, "unsealed"), (sealable, 4096, "unsealed"),
                              (r, 4096, "not a sealable memfd"), (good, 8192, "holds 4096")):
            with pytest.raises(bm.ProtocolError, match=why):
                _shm.check(fd, size)
        _shm.check(good, 4096)
    finally:
        for fd in (plain, sealable, r, w, good):
            os.close(fd)


def test_value_semantics_both_ways():
    a = np.arange(100_000, dtype=np.int64)
    fd, b = received(a)
    try:
        assert np.array_equal(a, b) and b.flags.writeable
        b[0] = -1          # the receiver's write stays its own
        a[1] = -2          # and the sender's (after sending) never reaches it
        c = np.frombuffer(_shm.map_segment(os.dup(fd), a.nbytes), dtype=a.dtype)
        assert c[0] == 0 and c[1] == 1 and b[1] == 1
    finally:
        os.close(fd)


def test_an_unwritten_mapping_can_be_passed_on_and_a_written_one_cannot():
    a = np.arange(1 << 20, dtype=np.float32)
    fd, b = received(a)
    os.close(fd)
    assert float(b.sum()) == float(a.sum())  # reading leaves it passable
    found = _shm.find(memoryview(b))
    assert found is not None and found[1:] == (a.nbytes, 0)
    assert _shm.find(memoryview(b[1000:3000]))[1:] == (a.nbytes, 1000 * 4)  # a slice: an offset
    assert _shm.find(memoryview(b).toreadonly()) == found  # a read-only view of it too
    assert _shm.find(memoryview(np.ones(10))) is None  # not a segment at all
    b[-1] = 7
    assert _shm.find(memoryview(b)) is None  # its bytes are not the segment's any more


def test_descriptors_and_mappings_are_released_with_the_last_view():
    _arena.ARENA.trim(0)  # the send pool (a cache) lets go first: only ours count
    fds, maps = open_fds(), memfd_maps()
    for _ in range(50):
        fd, b = received(np.ones(1 << 17))
        os.close(fd)
        view = b[10:20]
        del b
        gc.collect()
        assert memfd_maps() == maps + 1  # the slice keeps the mapping
        del view
        gc.collect()
    assert open_fds() == fds and memfd_maps() == maps and not _shm._mapped


def test_empty_segments():
    fd, b = received(np.zeros(0))
    os.close(fd)
    assert b.size == 0 and _shm.find(memoryview(b)) is None
