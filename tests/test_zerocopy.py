"""Zero-copy bulk data (issue 4).

- The bytes of an out-of-band buffer go from the sender's array to sendmsg
  and from recv_into straight into the receiver's final, aligned buffer, which
  the received array then is (socket calls recorded in-process on an
  InProcess machine; the array's base chain ends in an AlignedBuffer).
- Peak RSS of a 1 GiB transfer on both sides, in separate processes.
- Round trips bit for bit: dtypes, memory layouts, views, structured and
  object arrays, 0-d and empty arrays, bytes-likes, read-only flags, a
  message of 10,000 small arrays, and an array over 4 GiB.
- Lengths over the limits are refused before anything is allocated.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import bigmachine as bm
from bigmachine import _buffers, _node, _role, _rpc, _wire, _writer
from bigmachine._connection import Connection
from bigmachine._serialize import INBAND_MAX, dumps
from tests.conftest import TIMING, shared, unshare
from tests.test_transport import client_node, closed_within, raw_call, raw_connect

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's VmHWM to its current RSS; return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def address(buf) -> int:
    return np.frombuffer(buf, np.uint8).__array_interface__["data"][0]


def owner_chain(x) -> tuple[list, object]:
    """Follow ndarray.base / memoryview.obj down to the object owning the memory."""
    chain = []
    while True:
        chain.append(type(x).__name__)
        if isinstance(x, np.ndarray) and x.base is not None:
            x = x.base
        elif isinstance(x, memoryview):
            x = x.obj
        else:
            return chain, x


def describe(a) -> dict:
    chain, owner = owner_chain(a)
    info = {
        "address": a.__array_interface__["data"][0],
        "nbytes": a.nbytes,
        "chain": chain,
        "owner": type(owner).__name__,
        "c": a.flags.c_contiguous,
        "f": a.flags.f_contiguous,
        "writeable": a.flags.writeable,
    }
    if isinstance(owner, _buffers.AlignedBuffer):
        info["owner_address"] = owner.address
        info["owner_size"] = owner.size
    return info


@bm.service
class Z:
    def echo(self, x):
        return x

    def describe(self, a):
        return describe(a)

    def describe_all(self, arrays):
        return [describe(a) for a in arrays]

    def nbytes(self, a):
        return a.nbytes, int(a[-1]) if a.size else None

    def make(self, nbytes):
        return np.ones(nbytes, np.uint8)

    def checks(self, a, stride):
        """Size, wrapping uint64 sum, and strided samples of a big uint64 array."""
        return a.nbytes, int(a.sum(dtype=np.uint64)), a[::stride].copy(), int(a[-1])

    def rss(self):
        return _status("VmRSS")


@pytest.fixture(scope="module")
def inproc():
    """Machines whose arrays cross the socket, whose path these tests follow byte by
    byte (shared memory, the default on one host, has its own: tests/test_shm*)."""
    b = shared(bm.start(bm.InProcess(shared_memory=False), **TIMING))
    try:
        m, = b.start(1, services={"Z": Z()})
        yield b, m
    finally:
        unshare(b)


@pytest.fixture(scope="module")
def local():
    b = shared(bm.start(**TIMING))
    try:
        m, = b.start(1, services={"Z": Z()})
        yield b, m
    finally:
        unshare(b)


# ---- zero copy, asserted ------------------------------------------------------------


class SocketRecorder:
    """Records the memory each receive wrote to and each sendmsg read from (the
    _sockio calls, as the connection's reader and writer make them)."""

    def __init__(self, monkeypatch):
        self.received: list = []  # (address, bytes written there)
        self.sent: list = []      # (address, bytes taken from there)
        orig_recv_into = _role.recv_into
        orig_send_buffers = _writer.send_buffers
        rec = self

        def recv_into(sock, buffer, flags=0, spin=None):
            n = orig_recv_into(sock, buffer, flags, spin)
            if n > 0:
                rec.received.append((address(buffer), n))
            return n

        def send_buffers(sock, buffers, fds, flags):
            buffers = list(buffers)
            n = orig_send_buffers(sock, buffers, fds, flags)
            left = n
            for buf in buffers:
                size = memoryview(buf).nbytes
                if left <= 0:
                    break
                if size:
                    rec.sent.append((address(buf), min(size, left)))
                    left -= size
            return n

        monkeypatch.setattr(_role, "recv_into", recv_into)
        monkeypatch.setattr(_writer, "send_buffers", send_buffers)

    @staticmethod
    def covered(ranges: list, lo: int, hi: int) -> int:
        """Bytes of [lo, hi) inside the union of (address, length) ranges."""
        spans = sorted((max(a, lo), min(a + n, hi)) for a, n in ranges if a < hi and a + n > lo)
        total, end = 0, lo
        for a, b in spans:
            a = max(a, end)
            if b > a:
                total += b - a
                end = b
        return total

    @staticmethod
    def outside(ranges: list, lo: int, hi: int) -> int:
        return sum(n for a, n in ranges) - SocketRecorder.covered(ranges, lo, hi)


def test_bytes_go_from_the_array_to_the_socket_and_from_the_socket_into_the_array(inproc, monkeypatch):
    b, m = inproc
    arr = np.random.default_rng(1).random(8 << 20)  # 64 MiB of float64
    lo = arr.__array_interface__["data"][0]
    m.call("Z.echo", 0, timeout=10)  # connected
    rec = SocketRecorder(monkeypatch)
    m.call("Z.echo", 1, timeout=10)  # every reader is now inside a recorded recv_into
    rec.received.clear()
    rec.sent.clear()

    info = m.call("Z.describe", arr, timeout=60)

    # Sender: every byte of the array was handed to sendmsg from the array's
    # own memory, and next to nothing else was written (no concatenated copy).
    sent_direct = rec.covered(rec.sent, lo, lo + arr.nbytes)
    sent_other = rec.outside(rec.sent, lo, lo + arr.nbytes)
    # Receiver: the machine's array is an AlignedBuffer, 64-byte aligned, and
    # recv_into wrote the bytes right there.
    start = info["address"]
    recv_direct = rec.covered(rec.received, start, start + arr.nbytes)
    print(f"\nsent from the array: {sent_direct / arr.nbytes:.4%}, other bytes sent {sent_other}; "
          f"received in place: {recv_direct / arr.nbytes:.4%}; chain {info['chain']}")
    assert sent_direct == arr.nbytes
    assert sent_other < 64 << 10, f"{sent_other} bytes besides the array went to sendmsg"
    assert info["owner"] == "AlignedBuffer", info
    assert info["chain"][0] == "ndarray" and info["chain"][-1] == "AlignedBuffer", info
    assert start % 64 == 0
    assert info["owner_address"] <= start and start + arr.nbytes <= info["owner_address"] + info["owner_size"]
    # Only the first bytes after the message header may pass through the
    # decoder's scratch buffer (they arrive before it knows where they go).
    assert recv_direct >= arr.nbytes - (256 << 10), f"{arr.nbytes - recv_direct} bytes were copied"

    # and the reply: the driver's array is its receive buffer too
    rec.received.clear()
    back = m.call("Z.echo", arr, timeout=60)
    chain, owner = owner_chain(back)
    start = back.__array_interface__["data"][0]
    assert isinstance(owner, _buffers.AlignedBuffer), chain
    assert start % 64 == 0 and owner.address <= start < owner.address + owner.size
    assert rec.covered(rec.received, start, start + back.nbytes) >= back.nbytes - (256 << 10)
    assert np.array_equal(back, arr)


def test_small_arrays_land_aligned_in_one_shared_buffer(inproc):
    b, m = inproc
    arrays = [np.full(100 + i, i, np.float32) for i in range(200)]  # 400..1196 bytes, mixed
    infos = m.call("Z.describe_all", arrays, timeout=30)
    oob = [info for a, info in zip(arrays, infos) if a.nbytes > INBAND_MAX]
    assert oob, "no array went out of band"
    assert all(info["owner"] == "AlignedBuffer" for info in oob), oob[:2]
    assert len({info["owner_address"] for info in oob}) == 1, "small segments should share one allocation"
    assert all(info["address"] % 64 == 0 for info in oob)


# ---- peak memory of a 1 GiB transfer ---------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import bigmachine as bm
    from tests.test_zerocopy import Z, peak_rss, reset_peak_rss

    n = int(sys.argv[1])
    with bm.start(keepalive_period=0.25, lost_after=60, lease=70) as b:
        m, = b.start(1, services={"Z": Z()})
        m.call("Z.nbytes", np.ones(4 << 20, np.uint8), timeout=60)  # warm up
        a = np.empty(n, np.uint8)
        a.fill(7)  # resident before we measure
        m_rss = m.call("Z.rss", timeout=60)
        m_before = m.stats()["maxrss_bytes"]
        rss0 = reset_peak_rss()
        t = time.monotonic()
        reply = m.call("Z.nbytes", a, timeout=300)
        seconds = time.monotonic() - t
        peak = peak_rss()
        m_after = m.stats()["maxrss_bytes"]
    print(json.dumps({"reply": reply, "seconds": seconds, "sender_growth": peak - rss0,
                      "receiver_rss_before": m_rss, "receiver_maxrss_before": m_before,
                      "receiver_growth": m_after - m_before}))
""")


def test_peak_rss_of_a_1gib_transfer():
    n = 1 << 30
    if mem_available() < 6 * n:
        pytest.skip(f"needs 6 GiB available, have {mem_available() / 2**30:.1f} GiB")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n1 GiB transfer: {out['seconds']:.2f} s ({n / out['seconds'] / 2**30:.2f} GiB/s); "
          f"sender peak RSS +{out['sender_growth'] / 2**20:.1f} MiB; receiver max RSS "
          f"+{out['receiver_growth'] / 2**20:.1f} MiB (from {out['receiver_maxrss_before'] / 2**20:.0f} MiB)")
    assert out["reply"] == [n, 7] or tuple(out["reply"]) == (n, 7)
    assert out["sender_growth"] < 0.10 * n
    assert out["receiver_growth"] <= 1.1 * n + (64 << 20)


# ---- round trips, bit for bit ---------------------------------------------------------------

_rng = np.random.default_rng(7)


def _random_bits(dtype, n):
    return np.frombuffer(_rng.bytes(n * np.dtype(dtype).itemsize), dtype).copy()


_STRUCT = np.dtype([("id", "<i8"), ("pos", "<f4", (3,)), ("name", "S7"), ("flag", "?"),
                    ("inner", [("a", ">u2"), ("b", "<c8")])])


def _structured(n):
    return np.frombuffer(_rng.bytes(n * _STRUCT.itemsize), _STRUCT).copy()


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


_BASE2D = _random_bits("<f4", 300 * 200).reshape(300, 200)

ARRAYS = {
    "float64 bits (NaN payloads)": lambda: _random_bits("<f8", 1000),
    "int8": lambda: _random_bits("i1", 10_000),
    "complex128 bits": lambda: _random_bits("<c16", 1000),
    "bool": lambda: _rng.random(5000) < 0.5,
    "float16": lambda: _random_bits("<f2", 999),
    "big-endian int32": lambda: _random_bits(">i4", 1000),
    "datetime64": lambda: np.arange(1000).astype("datetime64[s]"),
    "small float64 (in band)": lambda: _random_bits("<f8", 10),
    "C order 2-d": lambda: _BASE2D.copy(order="C"),
    "Fortran order 2-d": lambda: np.asfortranarray(_BASE2D),
    "Fortran order 3-d": lambda: np.asfortranarray(_random_bits("<i2", 6 * 70 * 9).reshape(6, 70, 9)),
    "every other element": lambda: _random_bits("<f8", 4000)[::2],
    "reversed": lambda: _random_bits("<i4", 4000)[::-1],
    "transposed slice": lambda: _BASE2D.T[5:50],
    "strided 2-d window": lambda: _BASE2D[3:250:3, 10:190:7],
    "structured": lambda: _structured(500),
    "structured, small": lambda: _structured(3),
    "0-d float64": lambda: np.array(3.25),
    "0-d structured": lambda: _structured(1)[0:1].reshape(()),
    "empty 1-d": lambda: np.empty(0, "<f8"),
    "empty 2-d": lambda: np.empty((0, 5), "<i4"),
    "empty Fortran": lambda: np.empty((7, 0), "<f4", order="F"),
    "object": lambda: np.array([1, "a", None, [1, 2], {"k": 3.5}, b"x" * 600], dtype=object),
    "read-only large": lambda: _readonly(_random_bits("<f8", 1 << 17)),
    "read-only small (in band)": lambda: _readonly(_random_bits("<f8", 8)),
    "writable large": lambda: _random_bits("<f8", 1 << 17),
}


def _assert_same_array(a, back):
    assert isinstance(back, np.ndarray), type(back)
    assert back.dtype == a.dtype and back.shape == a.shape
    if a.dtype == object:
        assert back.tolist() == a.tolist()
    else:
        assert back.tobytes() == a.tobytes()  # bit for bit, NaN payloads included
    if a.flags.c_contiguous or a.flags.f_contiguous:
        assert (back.flags.c_contiguous, back.flags.f_contiguous) == (
            a.flags.c_contiguous, a.flags.f_contiguous), "memory order changed"
    assert back.flags.writeable == a.flags.writeable


@pytest.mark.parametrize("name", list(ARRAYS))
def test_array_round_trip(local, name):
    b, m = local
    a = ARRAYS[name]()
    back = m.call("Z.echo", a, timeout=30)
    _assert_same_array(a, back)
    if not a.flags.writeable:
        with pytest.raises(ValueError):
            back[...] = 0


def test_arrays_nested_and_shared_in_one_message(local):
    b, m = local
    x = _random_bits("<f8", 5000)
    msg = {"same twice": [x, x], "view": x[100:200], "tuple": (x.reshape(50, 100), 3, "s")}
    back = m.call("Z.echo", msg, timeout=30)
    assert back["same twice"][0] is back["same twice"][1]  # identity survives, one buffer sent
    assert back["view"].tobytes() == x[100:200].tobytes()
    assert back["tuple"][0].tobytes() == x.tobytes() and back["tuple"][1:] == (3, "s")


BUFFERS = {
    "bytes small": lambda: b"abc" * 10,
    "bytes 1 MiB": lambda: _rng.bytes(1 << 20),
    "bytearray small": lambda: bytearray(b"xyz" * 10),
    "bytearray 1 MiB": lambda: bytearray(_rng.bytes(1 << 20)),
    "memoryview of bytes": lambda: memoryview(_rng.bytes(1 << 16)),
    "memoryview of bytearray": lambda: memoryview(bytearray(_rng.bytes(1 << 16))),
    "memoryview of float64 2-d": lambda: memoryview(_random_bits("<f8", 4096).reshape(64, 64)),
    "PickleBuffer of bytearray": lambda: pickle.PickleBuffer(bytearray(_rng.bytes(1 << 16))),
    "PickleBuffer of bytes": lambda: pickle.PickleBuffer(_rng.bytes(1 << 16)),
}


@pytest.mark.parametrize("name", list(BUFFERS))
def test_bytes_like_round_trip(local, name):
    b, m = local
    x = BUFFERS[name]()
    back = m.call("Z.echo", x, timeout=30)
    raw = memoryview(x)
    got = memoryview(back)
    assert got.tobytes() == raw.tobytes()
    assert got.readonly == raw.readonly
    if isinstance(x, (bytes, bytearray, memoryview)):
        assert type(back) is type(x), f"{type(x).__name__} came back as {type(back).__name__}"
    if isinstance(x, memoryview):
        assert (got.format, got.shape, got.strides) == (raw.format, raw.shape, raw.strides)


@pytest.mark.parametrize("name", ["bytes 1 MiB", "bytearray 1 MiB", "memoryview of bytes",
                                  "memoryview of bytearray", "PickleBuffer of bytearray"])
def test_large_bytes_likes_travel_out_of_band(name):
    """The design: 'Every buffer that supports out-of-band pickling (numpy
    arrays, bytes, bytearray, memoryview, pickle.PickleBuffer) travels out of
    band, without copies.' Out of band means its bytes are not copied into the
    pickle stream (segment 0) but sent as a segment of their own."""
    x = BUFFERS[name]()
    segments, _ = dumps(x)
    size = memoryview(x).nbytes
    assert memoryview(segments[0]).nbytes < 1024, (
        f"{name}: {size} bytes were copied into the pickle stream")
    assert any(memoryview(s).nbytes == size for s in segments[1:])


def test_10000_small_arrays_in_one_message(local):
    b, m = local
    arrays = [np.full(512, i, np.float64) for i in range(10_000)]  # 4 KiB each, 40 MiB
    m.call("Z.echo", arrays[:10], timeout=30)
    t = time.monotonic()
    back = m.call("Z.echo", arrays, timeout=60)
    seconds = time.monotonic() - t
    print(f"\n10,000 arrays of 4 KiB, there and back: {seconds:.2f} s")
    assert len(back) == 10_000
    assert all(x.shape == (512,) and x[0] == i and x[-1] == i for i, x in enumerate(back))
    assert seconds < 5.0, f"{seconds:.1f} s for 40 MiB in 10,000 arrays"


def test_more_small_arrays_than_a_message_has_segments(local):
    """66,000 arrays of 520 bytes (just over INBAND_MAX) would need more
    out-of-band segments than the wire allows in one message (65,536). Either
    they arrive, or the call fails at once with a bigmachine error; in both
    directions, and the connection carries on."""
    b, m = local
    n = 66_000
    assert n > _wire.MAX_SEGMENTS
    arrays = [np.full(65, i, np.float64) for i in range(n)]
    t = time.monotonic()
    try:
        back = m.call("Z.echo", arrays, timeout=20)
    except bm.Error as exc:
        back = exc
    seconds = time.monotonic() - t
    assert not isinstance(back, bm.MachineLost)
    if isinstance(back, list):
        assert len(back) == n and all(x[0] == i for i, x in enumerate(back))
    assert seconds < 10, f"the call took {seconds:.1f} s (did a reply go missing?)"
    assert m.call("Z.echo", "after", timeout=10) == "after"


def test_array_over_4gib(local):
    b, m = local
    n = (4 << 30) // 8 + (1 << 20)  # 4 GiB + 8 MiB of uint64
    need = 12 << 30
    if mem_available() < need:
        pytest.skip(f"needs {need >> 30} GiB available (sender and receiver each hold "
                    f"{n * 8 / 2**30:.1f} GiB); have {mem_available() / 2**30:.1f} GiB")
    a = np.arange(n, dtype=np.uint64)
    stride = 1 << 16
    t = time.monotonic()
    nbytes, total, samples, last = m.call("Z.checks", a, stride, timeout=100)
    seconds = time.monotonic() - t
    print(f"\n{n * 8 / 2**30:.2f} GiB array: {seconds:.2f} s")
    assert nbytes == n * 8 > 1 << 32
    assert total == (n * (n - 1) // 2) % (1 << 64)
    assert np.array_equal(samples, a[::stride]) and last == n - 1


# ---- limits -----------------------------------------------------------------------------------


def _descriptor(sid: int, lengths: list) -> bytes:
    body = struct.pack("<BBHI", _wire.MTYPE_REQUEST, 0, 0, len(lengths))
    body += b"".join(struct.pack("<Q", n) for n in lengths)
    return struct.pack("<BBHIQ", _wire.KIND_MSG, 0, 0, sid, len(body)) + body


@pytest.mark.parametrize("lengths", [[1 << 40], [100, 1 << 40], [1 << 35, 1 << 35, 1 << 35],
                                     [_wire.MAX_MESSAGE]],
                         ids=["2**40", "second segment 2**40", "3 x 2**35", "the limit, beyond memory"])
def test_oversized_descriptor_closes_the_connection_without_allocating(local, lengths):
    b, m = local
    before = m.stats()["maxrss_bytes"]
    sock = raw_connect(m.addr, b.node.creds)
    try:
        assert raw_call(sock, 1, "Z.echo", "hello") == "hello"
        sock.sendall(_descriptor(3, lengths))
        closed_within(sock, 1.0)
    finally:
        sock.close()
    after = m.stats()["maxrss_bytes"]
    assert after - before < 16 << 20, f"the machine's peak RSS grew by {(after - before) >> 20} MiB"
    assert m.call("Z.echo", "alive", timeout=10) == "alive"


def test_connection_with_a_small_message_limit_refuses_a_bigger_reply(local, monkeypatch):
    b, m = local
    monkeypatch.setattr(_node, "Connection", functools.partial(Connection, max_message=1 << 20))
    with client_node(b.node.creds) as node:
        conn = node.connect(m.addr, timeout=5)
        assert conn.decoder.max_message == 1 << 20
        assert _rpc.call(conn, "Z.make", ((1 << 20) - 4096,), {}, 10).nbytes == (1 << 20) - 4096
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.monotonic()
        with pytest.raises(bm.MachineLost):
            _rpc.call(conn, "Z.make", (64 << 20,), {}, 10)
        assert time.monotonic() - t < 2
        assert conn.closed and isinstance(conn.error, bm.ProtocolError), conn.error
        assert "limit" in str(conn.error)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
        assert grew < 32 << 20, f"our peak RSS grew by {grew >> 20} MiB"
    assert m.call("Z.echo", "alive", timeout=10) == "alive"
