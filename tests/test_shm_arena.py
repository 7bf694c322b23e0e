"""A sender's pool of reusable shared-memory segments (bigmachine._arena).

A segment is rewritten only when no lent description of it is alive
anywhere (in flight, mapped, forwarded); a receiver's array never changes
under it; a holder that dies lets go; the pool stays within its budget; and
sending in a loop leaves both sides' memory and descriptors flat.
"""
from __future__ import annotations

import fcntl
import gc
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest

import bigmachine as bm
from bigmachine import _arena, _shm
from tests.conftest import TIMING, poll, shared, unshare
from tests.test_shm import open_fds as open_memfds
from tests.test_shm_transport import memfd_maps, segment_inode, settled

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not (_arena.AVAILABLE and _shm.AVAILABLE),
                                 reason="memfd sealing and OFD locks are Linux's")]

MiB = 1 << 20


def receive(lent: tuple[int, int], dtype=np.float64) -> np.ndarray:
    """What a receiver makes of a lent descriptor (the fd becomes the mapping's)."""
    fd, size = lent
    _shm.check(fd, size)
    return np.frombuffer(_shm.map_segment(fd, size), dtype=dtype)


def inode(lent: tuple[int, int]) -> int:
    return os.fstat(lent[0]).st_ino


def test_a_pool_segment_is_sealed_against_resizing_and_lent_read_only():
    arena = _arena.Arena()
    try:
        fd, size = arena.lend(memoryview(np.ones(MiB // 8)).cast("B"))
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & _shm.REQUIRED_SEALS == _shm.REQUIRED_SEALS and seals & fcntl.F_SEAL_SEAL
            for change in (lambda: os.ftruncate(fd, 8), lambda: os.ftruncate(fd, 2 * size),
                           lambda: os.pwrite(fd, b"x", 0)):
                with pytest.raises(OSError):
                    change()
            assert os.fstat(fd).st_size == size == MiB
        finally:
            os.close(fd)
    finally:
        arena.trim(0)


def test_a_held_segment_is_not_rewritten_and_a_released_one_is_reused():
    arena = _arena.Arena()
    a, b = np.arange(MiB, dtype=np.float64), -np.arange(MiB, dtype=np.float64)
    try:
        lent_a = arena.lend(memoryview(a).cast("B"))
        first = inode(lent_a)
        kept = receive(lent_a)              # the receiver keeps A
        lent_b = arena.lend(memoryview(b).cast("B"))
        second = inode(lent_b)
        assert second != first              # B went elsewhere
        got_b = receive(lent_b)
        assert np.array_equal(kept, a) and np.array_equal(got_b, b)
        kept[0] = 42.0                      # the receiver's write stays its own
        del kept, got_b
        gc.collect()                        # both let go: both segments free again
        c = np.full(MiB, 7.0)
        lent_c = arena.lend(memoryview(c).cast("B"))
        assert inode(lent_c) in (first, second)
        assert np.array_equal(receive(lent_c), c)  # the earlier write is not in it
        assert len(arena.segments) == 2
    finally:
        gc.collect()
        arena.trim(0)


def pooled(arena: _arena.Arena) -> set:
    """The inodes of the pool's segments."""
    return {os.fstat(s.fd).st_ino for s in arena.segments}


def test_a_forwarded_descriptor_keeps_the_segment_held():
    arena = _arena.Arena()
    a = np.arange(MiB, dtype=np.float64)
    try:
        lent = arena.lend(memoryview(a).cast("B"))
        first = inode(lent)
        received = receive(lent)
        fd, _, _ = _shm.find(memoryview(received))
        passed_on = os.dup(fd)             # what forwarding sends to the next machine
        del received
        gc.collect()                       # the first receiver let go, the next did not
        lent2 = arena.lend(memoryview(a).cast("B"))
        assert inode(lent2) != first
        os.close(lent2[0])
        os.close(passed_on)                # now nobody holds it
        lent3 = arena.lend(memoryview(a).cast("B"))
        assert inode(lent3) in pooled(arena) and len(arena.segments) == 2
        os.close(lent3[0])
    finally:
        arena.trim(0)


def test_a_smaller_send_in_a_larger_segment_carries_no_earlier_bytes():
    arena = _arena.Arena()
    try:
        fd, size = arena.lend(memoryview(np.full(MiB, 9, np.uint8)))
        os.close(fd)
        lent = arena.lend(memoryview(np.full(MiB - 64 * 1024, 1, np.uint8)))
        assert lent[1] == size            # the same segment, with room to spare
        got = receive(lent, np.uint8)
        assert (got[:MiB - 64 * 1024] == 1).all() and not got[MiB - 64 * 1024:].any()
    finally:
        gc.collect()
        arena.trim(0)


def test_the_pool_stays_within_its_budget_and_a_dropped_segment_lives_on_for_its_holder():
    arena = _arena.Arena(budget=3 * MiB)
    kept = []
    try:
        for i in range(5):
            kept.append(receive(arena.lend(memoryview(np.full(MiB // 8, float(i)))
                                           .cast("B"))))
            assert arena.held_bytes() <= 3 * MiB
        assert [float(k[0]) for k in kept] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert arena.lend(memoryview(np.ones(4 * MiB, np.uint8))) is None  # over budget
    finally:
        del kept
        gc.collect()
        arena.trim(0)


def test_idle_segments_are_given_back():
    arena = _arena.Arena(idle=0.1)
    fd, _ = arena.lend(memoryview(np.ones(MiB, np.uint8)))
    os.close(fd)
    assert arena.held_bytes() == MiB
    poll(lambda: arena.held_bytes() == 0, timeout=5)


def test_a_forked_child_does_not_fill_its_parents_segments():
    fd, _ = _arena.ARENA.lend(memoryview(np.ones(MiB, np.uint8)))
    os.close(fd)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child: its pool starts empty
            os.write(w, str(len(_arena.ARENA.segments)).encode())
            os._exit(0)
        os.close(w)
        w = -1
        assert select.select([r], [], [], 10)[0], "the child did not answer"
        assert os.read(r, 16) == b"0"
        assert poll(lambda: os.waitpid(pid, os.WNOHANG) == (pid, 0), timeout=10)
        assert _arena.ARENA.held_bytes() >= MiB  # the parent's are still there
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        _arena.ARENA.trim(0)


_HOLDER = """
import mmap, os, sys, time
fd, size = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
print(m[0], flush=True)
time.sleep(60)
"""


def test_a_holder_killed_while_holding_lets_go():
    arena = _arena.Arena()
    a = np.full(MiB, 5, np.uint8)
    try:
        fd, size = arena.lend(memoryview(a))
        first = os.fstat(fd).st_ino
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(fd), str(size)],
                                  pass_fds=[fd], stdout=subprocess.PIPE, text=True)
        os.close(fd)
        try:
            assert holder.stdout.readline().strip() == "5"  # it maps the segment
            other = arena.lend(memoryview(a))
            assert os.fstat(other[0]).st_ino != first       # so that one is not rewritten
            os.close(other[0])
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
            holder.stdout.close()
        again = arena.lend(memoryview(np.full(MiB, 6, np.uint8)))
        assert inode(again) in pooled(arena) and len(arena.segments) == 2
        assert (receive(again, np.uint8) == 6).all()
    finally:
        gc.collect()
        arena.trim(0)


# ---- between machines ------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@bm.service
class Holder:
    def __init__(self):
        self.kept: dict = {}

    def keep(self, key, a):
        self.kept[key] = a
        return segment_inode(a)

    def check(self, key, first, last):
        a = self.kept[key]
        return float(a[0]) == first and float(a[-1]) == last

    def write(self, key, value):
        self.kept[key][:] = value

    def inode(self, a):
        return segment_inode(a)

    def touch_and_keep(self, a):
        """Keep a, read every page of it; this process's RSS growth meanwhile."""
        before = rss()
        self.kept["big"] = a
        float(a[::512].sum())
        return rss() - before

    def drop(self):
        self.kept.clear()
        gc.collect()
        _arena.ARENA.trim(0)

    def memory(self):
        gc.collect()
        return rss(), settled()

    def pid(self):
        return os.getpid()


@pytest.fixture(scope="module")
def machines():
    b = shared(bm.start(shared_memory=True, **TIMING))
    try:
        ma, mb = b.start(2, services={"Holder": Holder()})
        yield b, ma, mb
    finally:
        unshare(b)


def test_a_kept_array_is_unchanged_by_later_sends_and_its_writes_stay_there(machines):
    b, ma, _ = machines
    a = np.arange(4 * MiB, dtype=np.float64)
    first = ma.call("Holder.keep", "a", a, timeout=30)
    for i in range(3):   # same size: the pool would reuse A's segment if it were free
        other = np.full(4 * MiB, float(i))
        assert ma.call("Holder.inode", other, timeout=30) != first
    assert ma.call("Holder.check", "a", 0.0, 4 * MiB - 1.0, timeout=30)
    ma.call("Holder.write", "a", -1.0, timeout=30)   # the receiver writes its copy
    c = np.full(4 * MiB, 3.0)
    assert ma.call("Holder.keep", "c", c, timeout=30) != first
    assert ma.call("Holder.check", "c", 3.0, 3.0, timeout=30)
    ma.call("Holder.drop", timeout=30)
    assert ma.call("Holder.keep", "a", c, timeout=30) is not None
    ma.call("Holder.drop", timeout=30)


def test_a_released_segment_is_reused(machines):
    b, ma, _ = machines
    a = np.ones(8 * MiB, dtype=np.float64)
    inodes = {ma.call("Holder.inode", a, timeout=30) for _ in range(10)}
    assert len(inodes) <= 2  # sends in a row go through the same (pre-faulted) segment(s)


def test_many_sends_of_64_mib_leave_memory_and_descriptors_flat(machines):
    """1,000 sends: about 10 s here (a copy into a reused segment each)."""
    b, ma, _ = machines
    a = np.ones(64 * MiB, dtype=np.uint8)
    _arena.ARENA.trim(0)  # no older segment of ours goes idle (and away) in the loop
    for _ in range(5):
        ma.call("Holder.inode", a, timeout=30)
    gc.collect()
    theirs = ma.call("Holder.memory", timeout=30)
    ours = rss(), open_memfds(), memfd_maps()
    for _ in range(1000):
        ma.call("Holder.inode", a, timeout=30)
    gc.collect()
    after = rss(), open_memfds(), memfd_maps()
    assert after[1:] == ours[1:]
    assert after[0] - ours[0] < 32 * MiB
    rss_theirs, resources = ma.call("Holder.memory", timeout=30)
    assert resources == theirs[1] and rss_theirs - theirs[0] < 32 * MiB
    _arena.ARENA.trim(0)


def test_receiving_512_mib_grows_the_receivers_rss_by_at_most_the_payload(machines):
    b, ma, _ = machines
    a = np.ones(512 * MiB, dtype=np.uint8)
    ma.call("Holder.drop", timeout=30)
    try:
        grown = ma.call("Holder.touch_and_keep", a, timeout=60)
        assert grown <= 512 * MiB + 16 * MiB
    finally:
        ma.call("Holder.drop", timeout=30)
        del a
        _arena.ARENA.trim(0)


def test_a_holder_killed_while_holding_does_not_hang_or_corrupt_the_sender():
    b = bm.start(shared_memory=True, **TIMING)
    try:
        victim, survivor = b.start(2, services={"Holder": Holder()})
        a = np.full(2 * MiB, 1.0)
        first = victim.call("Holder.keep", "a", a, timeout=30)
        os.kill(victim.call("Holder.pid", timeout=30), signal.SIGKILL)
        victim.wait(bm.State.STOPPED, timeout=30)
        # The dead holder's descriptor is gone: its segment is free again, and rewritten.
        poll(lambda: survivor.call("Holder.inode", np.full(2 * MiB, 2.0), timeout=30) == first,
             timeout=10)
        assert survivor.call("Holder.keep", "b", np.full(2 * MiB, 3.0), timeout=30) == first
        assert survivor.call("Holder.check", "b", 3.0, 3.0, timeout=30)
    finally:
        b.shutdown()
        _arena.ARENA.trim(0)
