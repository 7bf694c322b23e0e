"""Arrays through shared memory between machines on one host (issue 13).

Large out-of-band buffers on Unix-socket links travel as sealed memfds
(SCM_RIGHTS) mapped copy-on-write: value semantics both ways, an unwritten
received array passed on with the same descriptor, descriptors and mappings
released, a peer that breaks the rules loses its connection only, and a
receiver out of descriptors fails the call with ResourceError and goes on.
"""
from __future__ import annotations

import array
import gc
import os
import resource
import socket

import numpy as np
import pytest

import bigmachine as bm
from bigmachine import _arena, _buffers, _decoder, _shm, _shmlink, _wire
from bigmachine._serialize import dumps, loads
from tests.conftest import TIMING, shared, unshare
from tests.test_transport import closed_within, raw_connect

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not _shmlink.AVAILABLE, reason="memfd sealing is Linux's")]

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled() -> tuple[int, int]:
    """(open descriptors, mapped memfds) once garbage is collected and this
    process's pool of send segments (a cache, see _arena) has let go of its own."""
    gc.collect()
    _arena.ARENA.trim(0)
    return open_fds(), memfd_maps()


def memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("bigmachine-array" in line for line in f)


def segment_inode(a: np.ndarray):
    """The inode of the memfd a lives in, or None if a is not a received segment."""
    x = a
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    while isinstance(x, memoryview):
        x = x.obj
    return os.fstat(x.fd).st_ino if isinstance(x, _buffers.SharedMapping) else None


@bm.service
class S:
    def __init__(self):
        self.kept = None
        self.spare: list = []

    def keep(self, a):
        self.kept = a
        return segment_inode(a), a.flags.writeable

    def write_kept(self, i, value):
        self.kept[i] = value

    def kept_value(self, i):
        return float(self.kept[i])

    def kept_back(self):
        return self.kept

    def echo(self, a):
        return a

    def inode(self, a):
        return segment_inode(a)

    def forward(self, addr, write):
        """Pass the kept array on to the machine at addr; the inode it got."""
        if write:
            self.kept[0] = -5.0
        return bm.current().dial(addr).call("S.inode", self.kept), segment_inode(self.kept)

    def forward_value(self, addr):
        return bm.current().dial(addr).call("S.first", self.kept)

    def first(self, a):
        return float(a[0])

    def drop(self):
        self.kept = None
        gc.collect()

    def resources(self):
        return settled()

    def starve(self):
        """Use up this process's descriptors (RLIMIT_NOFILE lowered to what is open + 4)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.spare.append((soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 4, hard))
        try:
            while True:
                self.spare.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass

    def feed(self):
        (soft, hard), fds = self.spare[0], self.spare[1:]
        for fd in fds:
            os.close(fd)
        self.spare = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def machines():
    b = shared(bm.start(shared_memory=True, **TIMING))
    try:
        ma, mb = b.start(2, services={"S": S()})
        yield b, ma, mb
    finally:
        unshare(b)


def test_value_semantics_both_ways(machines):
    b, ma, _ = machines
    a = np.arange(2 * MiB, dtype=np.float64)
    inode, writeable = ma.call("S.keep", a)
    assert inode is not None and writeable  # a mapped segment, an ordinary writable array
    a[1] = -1.0                      # the sender writes after the call
    assert ma.call("S.kept_value", 1) == 1.0
    ma.call("S.write_kept", 2, -2.0)  # the receiver writes
    assert a[2] == 2.0
    back = ma.call("S.kept_back")     # written there: a new copy, with its bytes
    assert back[2] == -2.0 and back.flags.writeable
    back[3] = -3.0                    # the driver writes what it received
    assert ma.call("S.kept_value", 3) == 3.0


def test_an_unwritten_array_is_passed_on_with_the_same_segment(machines):
    b, ma, mb = machines
    a = np.arange(4 * MiB, dtype=np.float32)
    inode, _ = ma.call("S.keep", a)
    assert ma.call("S.echo", a) is not None
    got, mine = ma.call("S.forward", mb.addr, False)   # machine to machine, unwritten
    assert got == mine == inode
    back = ma.call("S.kept_back")                        # a reply, unwritten
    assert segment_inode(back) == inode
    assert mb.call("S.inode", back) == inode             # the driver passes it on too
    assert mb.call("S.inode", back[1000:]) == inode      # a slice of it: same segment
    got, mine = ma.call("S.forward", mb.addr, True)     # written: a new copy
    assert got != inode and mine == inode
    assert ma.call("S.forward_value", mb.addr) == -5.0  # that carries the written bytes


def test_descriptors_and_mappings_are_released(machines):
    b, ma, mb = machines
    a = np.ones(3 * MiB, dtype=np.uint8)
    ma.call("S.drop")
    for m in (ma, mb):
        m.call("S.echo", a)  # connections and threads settled
    fds, maps = settled()
    theirs = ma.call("S.resources")
    for _ in range(30):
        back = ma.call("S.echo", a)
        assert back[-1] == 1
        ma.call("S.keep", back)
        mb.call("S.inode", back)
    del back
    ma.call("S.drop")
    assert settled() == (fds, maps)
    assert ma.call("S.resources") == theirs


def test_many_sends_leave_memory_and_descriptors_flat(machines):
    b, ma, _ = machines
    a = np.ones(64 * MiB, dtype=np.uint8)
    ma.call("S.echo", a)
    before = ma.call("S.resources")
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for _ in range(100):
        ma.call("S.inode", a)
    gc.collect()
    with open("/proc/self/statm") as f:
        rss1 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert ma.call("S.resources") == before
    assert rss1 - rss0 < 32 * MiB


def test_a_receiver_out_of_descriptors_fails_the_call_and_goes_on(machines):
    b, ma, _ = machines
    a = np.arange(MiB, dtype=np.float64)
    ma.call("S.starve")
    try:
        with pytest.raises(bm.ResourceError, match="out of descriptors"):
            ma.call("S.inode", a)
        assert ma.call("S.first", a[:10].copy()) == 0.0  # small: on the socket, still fine
    finally:
        ma.call("S.feed")
    assert ma.call("S.inode", a) is not None  # the connection is still usable


# ---- a peer that breaks the rules ----------------------------------------------------------

def shm_request(sid: int, obj, fds: list, spec: tuple) -> tuple[bytes, list]:
    """The bytes of a request whose one large buffer travels as spec (size, offset)."""
    segments, readonly = dumps(("S.first", (obj,), {}))
    assert len(segments) == 2
    units, _ = _wire.message_frames(sid, _wire.MTYPE_REQUEST, 0, segments, readonly,
                                    shm=[None, spec])
    return b"".join(bytes(memoryview(buf).cast("B")) for unit in units for buf in unit), fds


def send_with_fds(sock: socket.socket, data: bytes, fds: list) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):  # sendall(b"") would still write, and fail once the peer has closed
        sock.sendall(data[sent:])


def plain_memfd(a: np.ndarray) -> int:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.pwrite(fd, memoryview(a).cast("B"), 0)
    return fd


@pytest.mark.parametrize("case", ["well-formed", "unsealed", "mis-sized", "too few", "too many",
                                  "offset past the end"])
def test_a_peer_that_breaks_the_rules_loses_its_connection_only(machines, case):
    b, ma, _ = machines
    a = np.full(MiB // 8, 3.0)
    sealed = _shm.create(memoryview(a))
    spec, fds = (a.nbytes, 0), [sealed]
    if case == "unsealed":
        fds = [plain_memfd(a)]
    elif case == "mis-sized":
        spec = (a.nbytes + 4096, 0)
    elif case == "too few":
        fds = []
    elif case == "too many":
        fds = [sealed, os.dup(sealed)]
    elif case == "offset past the end":
        spec = (a.nbytes, 8)
    sock = raw_connect(ma.addr, b.node.creds)
    try:
        data, fds = shm_request(1, a, fds, spec)
        send_with_fds(sock, data, fds)
        if case == "well-formed":
            from tests.test_transport import raw_reply
            assert raw_reply(sock, 1) == 3.0
        else:
            closed_within(sock, 5)
    finally:
        sock.close()
        for fd in set(fds) | {sealed}:
            os.close(fd)
    assert ma.call("S.first", a) == 3.0  # the machine and our own link carry on


# ---- the decoder, without sockets ------------------------------------------------------------

def frames(obj, spec_for_large=True) -> tuple[bytes, np.ndarray]:
    segments, readonly = dumps(obj)
    shm = [None] + [(memoryview(s).nbytes, 0) for s in segments[1:]] if spec_for_large else None
    units, _ = _wire.message_frames(3, _wire.MTYPE_REPLY, 0, segments, readonly, shm=shm)
    return b"".join(bytes(memoryview(buf).cast("B")) for unit in units for buf in unit)


def test_the_decoder_maps_each_message_its_own_descriptors():
    a = np.arange(MiB // 4, dtype=np.float32)
    decoder = _decoder.Decoder(map_shm=_shmlink.map_received)
    decoder.add_fds([_shm.create(memoryview(a))])
    (event,) = decoder.feed(frames(a))
    back = loads(event[4])
    assert np.array_equal(back, a) and segment_inode(back) is not None


def test_a_lost_batch_fails_that_message_with_resource_error():
    a = np.arange(MiB // 4, dtype=np.float32)
    decoder = _decoder.Decoder(map_shm=_shmlink.map_received)
    decoder.add_fds([], truncated=True)
    (event,) = decoder.feed(frames(a))
    with pytest.raises(bm.ResourceError):
        loads(event[4])


def test_descriptors_on_a_link_without_shared_memory_are_malformed():
    a = np.arange(MiB // 4, dtype=np.float32)
    fd = _shm.create(memoryview(a))
    decoder = _decoder.Decoder()
    decoder.add_fds([fd])
    fds = settled()[0]
    with pytest.raises(_wire.WireError):
        decoder.feed(frames(a))
    decoder.close()
    assert open_fds() == fds - 1  # the decoder closed what it was given
