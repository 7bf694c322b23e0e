"""The transport under load and under attack (issue 3).

Real loopback sockets throughout: a Local machine (a child process) for most
tests, client Nodes of our own for connection-level knobs, and raw sockets
that speak the handshake (bigmachine._auth) and then send frames by hand.

What is covered:

- multiplexing: 10,000 calls in flight on one connection, replies matched;
- interleaving: small calls stay prompt while 512 MiB are in flight;
- flow control: a stalled reader does not grow the sender's memory past the
  queue cap, and a call's timeout still holds while its send is held back;
- the in-flight gate: extra callers wait, then all finish;
- cancellation reaches the callee (sync: bm.cancelled(); async: CancelledError);
- malformed frames from an authenticated peer close that connection only;
  a late reply to a cancelled call is dropped;
- call-level faults (unpicklable replies, exceptions) fail one call only;
- wrong handshake peers: foreign protocols dropped at once, a wrong secret is
  AuthError, a wrong protocol version ProtocolError naming both versions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
import os
import random
import socket
import struct
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

import bigmachine as bm
from bigmachine import _auth, _decoder, _rpc, _wire
from bigmachine._auth import Credentials
from bigmachine._node import Node
from bigmachine._serialize import dumps, load_exception, loads
from tests.conftest import TIMING, poll, shared, unshare
from tests.services import Echo
from tests.rawpeer import client_handshake, connect, server_handshake

pytestmark = pytest.mark.timeout(90)

HEADER = struct.Struct("<BBHIQ")
MSG, DATA, CANCEL, PING = _wire.KIND_MSG, _wire.KIND_DATA, _wire.KIND_CANCEL, _wire.KIND_PING


# ---- a service of our own (machines import it as tests.test_transport) -------------


def _refuse_unpickling():
    raise RuntimeError("this object refuses to be unpickled")


class Unloadable:
    """Pickles fine, fails when unpickled."""

    def __reduce__(self):
        return (_refuse_unpickling, ())


@bm.service
class T:
    def init(self, machine):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def square(self, x):
        return (x, x * x + 1)

    async def asquare(self, x):
        await asyncio.sleep(random.random() * 0.05)  # replies come back out of order
        return (x, 3 * x + 7)

    def total(self, arr):
        return int(arr.sum(dtype=np.uint64))

    def make(self, nbytes):
        return np.ones(nbytes, np.uint8)

    def held(self, seconds):
        """Counts how many of these run at once."""
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(seconds)
        with self.lock:
            self.active -= 1
        return True

    def reset_peak(self):
        with self.lock:
            self.peak = 0

    def get_peak(self):
        return self.peak

    def lock_reply(self):
        return threading.Lock()

    def unloadable_reply(self):
        return Unloadable()

    def items_then_lock(self):
        yield 1
        yield threading.Lock()
        yield 3

    def pid(self):
        return os.getpid()


@pytest.fixture(scope="module")
def local():
    b = shared(bm.start(**TIMING))
    try:
        m, = b.start(1, services={"T": T(), "Echo": Echo("transport")})
        yield b, m
    finally:
        unshare(b)


# ---- helpers ---------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw_connect(addr: str, creds: Credentials, timeout: float = 5.0) -> socket.socket:
    """A plain socket that has passed the client side of the handshake."""
    sock = connect(addr, timeout)
    client_handshake(sock, creds)
    return sock


def message_bytes(sid: int, mtype: int, obj, mflags: int = 0) -> bytes:
    segments, readonly = dumps(obj)
    units, _ = _wire.message_frames(sid, mtype, mflags, segments, readonly)
    return b"".join(bytes(memoryview(buf).cast("B")) for unit in units for buf in unit)


def raw_reply(sock: socket.socket, sid: int, timeout: float = 5.0):
    """Decode frames by hand until the reply on stream sid; raise it if it is an error."""
    decoder = _decoder.Decoder()
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(1 << 20)
        if not data:
            raise EOFError("the machine closed the connection")
        for event in decoder.feed(data):
            if event[0] == MSG and event[1] == sid:
                if event[2] == _wire.MTYPE_ERROR:
                    raise load_exception(event[4])
                return loads(event[4])


def raw_call(sock: socket.socket, sid: int, method: str, *args, timeout: float = 5.0):
    """Send a request by hand and decode the reply by hand."""
    sock.sendall(message_bytes(sid, _wire.MTYPE_REQUEST, (method, args, {})))
    return raw_reply(sock, sid, timeout)


def closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the peer closed sock (EOF or reset); fails after limit."""
    t0 = time.monotonic()
    deadline = t0 + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the connection was still open after {limit} s")
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        except socket.timeout:
            pytest.fail(f"the connection was still open after {limit} s")


class RawServer:
    """A loopback server that passes the server side of the handshake with creds
    for one client, then hands the socket to handler(sock, stop_event)."""

    def __init__(self, creds: Credentials, handler):
        self.creds = creds
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.sock = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="raw-server")
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(10)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        self.sock = sock
        sock.settimeout(10)
        server_handshake(sock, self.creds)
        self.handler(sock, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def client_node(creds: Credentials, name: str = "client"):
    """A Node of our own, for connections whose knobs we can turn."""
    node = Node(creds, name)
    node.start_thread()
    try:
        yield node
    finally:
        node.close()


def never_read(sock: socket.socket, stop: threading.Event) -> None:
    stop.wait(60)


def run_in_thread(fn, *args):
    """Start fn in a daemon thread; returns (thread, box) with box['result'/'error'/'elapsed']."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc
        box["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# ---- multiplexing ------------------------------------------------------------------


def test_10000_concurrent_acalls_on_one_connection(local):
    b, m = local
    n = 10_000
    conn = m.connection(10)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], conn.gate.used)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    async def go():
        return await asyncio.gather(*(m.acall("T.asquare", i, timeout=60) for i in range(n)))

    t0 = time.monotonic()
    try:
        replies = asyncio.run(asyncio.wait_for(go(), 80))
    finally:
        stop.set()
        watcher.join(5)
    elapsed = time.monotonic() - t0
    print(f"\n10,000 concurrent acalls: {elapsed:.2f} s, peak in flight {peak[0]}")
    assert replies == [(i, 3 * i + 7) for i in range(n)]
    assert m._conn is conn and not conn.closed  # one connection carried them all
    assert peak[0] >= 1000, f"only {peak[0]} calls were ever in flight at once"
    assert conn.gate.used == 0 and not conn.calls


def test_10000_calls_from_100_threads_on_one_connection(local):
    b, m = local
    conn = m.connection(10)
    threads, per = 100, 100
    start = threading.Barrier(threads, timeout=10)
    wrong: list = []
    errors: list = []

    def worker(k: int) -> None:
        try:
            start.wait()
            for j in range(per):
                x = k * per + j
                reply = m.call("T.square", x, timeout=30)
                if reply != (x, x * x + 1):
                    wrong.append((x, reply))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    elapsed = time.monotonic() - t0
    print(f"\n10,000 calls from 100 threads: {elapsed:.2f} s")
    assert not any(t.is_alive() for t in pool), "some callers never finished"
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    assert m._conn is conn and not conn.closed and not conn.calls


def test_10000_concurrent_acalls_from_20_threads_each_with_its_own_loop(local):
    """20 threads, each running asyncio.run() with 500 acalls gathered: all
    10,000 in flight at once across 21 event loops, replies to the right loop."""
    b, m = local
    conn = m.connection(10)
    threads, per = 20, 500
    start = threading.Barrier(threads, timeout=10)

    def worker(k: int):
        async def go():
            return await asyncio.gather(*(m.acall("T.asquare", k * per + j, timeout=60)
                                          for j in range(per)))
        start.wait()
        return asyncio.run(asyncio.wait_for(go(), 80))

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads), timeout=90))
    elapsed = time.monotonic() - t0
    print(f"\n10,000 acalls from 20 loops on 20 threads: {elapsed:.2f} s")
    for k, replies in enumerate(results):
        assert replies == [(x, 3 * x + 7) for x in range(k * per, (k + 1) * per)]
    assert m._conn is conn and not conn.closed and not conn.calls and conn.gate.used == 0


# ---- interleaving ------------------------------------------------------------------


def _small_calls_during(m, big_done: threading.Event, limit: float = 30.0) -> list:
    """Make small calls back to back until big_done; return (start, latency) of each."""
    out = []
    deadline = time.monotonic() + limit
    k = 0
    while not big_done.is_set() and time.monotonic() < deadline:
        t = time.monotonic()
        assert m.call("T.square", k, timeout=10) == (k, k * k + 1)
        out.append((t, time.monotonic() - t))
        k += 1
    return out


@pytest.mark.parametrize("big_timeout", [60, None], ids=["timed", "untimed"])
@pytest.mark.parametrize("direction", ["request", "reply"])
def test_small_calls_are_prompt_while_512mib_are_in_flight(local, direction, big_timeout):
    """Whether or not the big call has a deadline (a blocking caller reads its
    own reply once its request is out, never while still sending it)."""
    b, m = local
    size = 512 << 20
    big = np.ones(size, np.uint8) if direction == "request" else None
    m.call("T.square", 0, timeout=10)  # connected and warm
    done = threading.Event()
    box: dict = {}

    def send_big():
        box["t0"] = time.monotonic()
        try:
            if direction == "request":
                box["result"] = m.call("T.total", big, timeout=big_timeout)
            else:
                box["result"] = m.call("T.make", size, timeout=big_timeout).nbytes
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
        box["t1"] = time.monotonic()
        done.set()

    thread = threading.Thread(target=send_big, daemon=True)
    thread.start()
    time.sleep(0.02)  # the big message is on its way
    small = _small_calls_during(m, done)
    thread.join(60)
    assert "error" not in box, box.get("error")
    assert box["result"] == size
    big_seconds = box["t1"] - box["t0"]
    latencies = [lat for _, lat in small]
    print(f"\n512 MiB {direction}: {big_seconds:.2f} s; {len(small)} small calls meanwhile, "
          f"latency max {max(latencies, default=0) * 1e3:.1f} ms, "
          f"median {sorted(latencies)[len(latencies) // 2] * 1e3 if latencies else 0:.1f} ms")
    # The small calls started while the big message was in flight and came back
    # before it, none waiting for the whole of it: 99% within 50 ms (the bound of
    # issue 11), the slowest within half the transfer. (It was "each within
    # 250 ms": under CI's parallel load one call of 1,410 took 414 ms, while the
    # 0.87 s transfer went on, as one took 143 ms on the code before this round;
    # a small call queued behind the big message would take most of the transfer.)
    assert len(small) >= 3, (f"only {len(small)} small calls completed during the "
                             f"{big_seconds:.2f} s transfer")
    assert small[0][0] + small[0][1] < box["t1"], "the first small call finished after the big one"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    assert p99 < 0.05, f"99% of small calls within {p99 * 1e3:.0f} ms"
    assert max(latencies) < max(0.25, big_seconds / 2), \
        f"a small call took {max(latencies) * 1e3:.0f} ms of the {big_seconds:.2f} s transfer"


def test_a_tls_link_keeps_every_message_intact_when_its_socket_fills():
    """Small replies and large arrays share a TLS link from many threads at
    once, so that the socket fills and ciphertext waits for the IO loop: each
    call gets its own reply, and every byte of every array arrives."""
    with bm.start(bm.InProcess(tls=True), **TIMING) as b:
        m, = b.start(1, services={"T": T(), "Echo": Echo("tls")})
        rng = np.random.default_rng(7)
        arrays = [rng.integers(0, 255, (8 << 20) + k * 4099, dtype=np.uint8) for k in range(4)]

        def small(k):
            return [m.call("T.square", k * 1000 + i, timeout=30) for i in range(200)]

        def large(arr):
            return m.call("Echo.echo", arr, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            smalls = [pool.submit(small, k) for k in range(8)]
            larges = [pool.submit(large, arr) for arr in arrays]
            for k, fut in enumerate(smalls):
                assert fut.result(timeout=90) == [(k * 1000 + i, (k * 1000 + i) ** 2 + 1)
                                                   for i in range(200)]
            for arr, fut in zip(arrays, larges):
                back = fut.result(timeout=90)
                assert back.dtype == arr.dtype and np.array_equal(back, arr)


# ---- flow control ------------------------------------------------------------------


def test_stalled_reader_does_not_grow_sender_memory_past_the_cap():
    """The peer authenticates and then never reads. Four threads keep calling
    with fresh 8 MiB arrays and a short timeout, dropping each array when the
    call gives up: after the kernel's socket buffers fill, only the
    connection's write queue keeps those arrays alive (zero-copy sends hold
    references to the caller's memory until the bytes are written).

    The arrays live in anonymous mmaps, so that their memory is returned to
    the OS the moment the last reference goes, and RSS measures exactly the
    arrays still alive. The bound asserted on RSS growth is

        max_queued (64 MiB)
        + one message per sending thread (a sender may put one message on the
          queue before it learns the queue is over the cap, and it holds that
          array while it waits)
        + 48 MiB slack (thread stacks, pickle streams, allocator noise).

    An unbounded queue would grow by up to 4 * 40 * 8 MiB = 1.25 GiB here.
    """
    creds = Credentials.generate()
    threads, size, attempts = 4, 8 << 20, 40
    with RawServer(creds, never_read) as server, client_node(creds) as node:
        conn = node.connect(server.addr, timeout=5)
        cap = conn.writer.max_queued
        rss0 = rss()
        stop = threading.Event()
        progress = [0] * threads

        def sender(k: int) -> None:
            for _ in range(attempts):
                if stop.is_set():
                    return
                buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
                arr = np.frombuffer(buf, np.uint8)
                arr.fill(1)  # resident
                try:
                    _rpc.call(conn, "T.total", (arr,), {}, 0.05)
                except (TimeoutError, bm.MachineLost):
                    pass
                del arr, buf
                progress[k] += 1

        pool = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(threads)]
        for t in pool:
            t.start()
        peak_rss, peak_queued = rss0, 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(t.is_alive() for t in pool):
            peak_rss = max(peak_rss, rss())
            peak_queued = max(peak_queued, conn.writer.queued)
            time.sleep(0.005)
        stop.set()
        sent = sum(progress)
        conn.fail(bm.MachineLost(server.addr, "test over"))
        for t in pool:
            t.join(10)
        assert not any(t.is_alive() for t in pool), "senders still blocked after the connection closed"
    growth = peak_rss - rss0
    bound = cap + threads * size + (48 << 20)
    print(f"\nstalled reader: {sent} arrays of 8 MiB attempted; peak queued "
          f"{peak_queued / 2**20:.0f} MiB; RSS growth {growth / 2**20:.0f} MiB "
          f"(bound {bound / 2**20:.0f} MiB)")
    assert growth <= bound, f"RSS grew by {growth / 2**20:.0f} MiB, over {bound / 2**20:.0f} MiB"
    assert peak_queued <= cap + threads * (size + (64 << 10)), peak_queued


def _fill_send_queue(conn):
    """Start a call whose request alone is more than the socket and the cap hold."""
    filler = np.ones(conn.writer.max_queued + (128 << 20), np.uint8)  # beyond any socket buffering
    thread, box = run_in_thread(_rpc.call, conn, "T.total", (filler,), {}, 0.2)
    poll(lambda: conn.writer.queued > conn.writer.max_queued or "elapsed" in box, timeout=5)
    assert conn.writer.queued > conn.writer.max_queued, "the write queue never went over its cap"
    return thread, box


@pytest.mark.parametrize("payload", [0, 8 << 20], ids=["small", "8 MiB"])
def test_call_timeout_holds_while_its_send_is_held_back_by_flow_control(payload):
    """With the write queue over its cap (the peer reads nothing), a call with
    timeout=0.5 must give up after about 0.5 s, not wait for the queue to
    drain (which here is never). Same for acall."""
    creds = Credentials.generate()
    arg = np.ones(payload, np.uint8)
    with RawServer(creds, never_read) as server, client_node(creds) as node:
        conn = node.connect(server.addr, timeout=5)
        fill_thread, fill_box = _fill_send_queue(conn)
        sync_thread, sync_box = run_in_thread(_rpc.call, conn, "T.total", (arg,), {}, 0.5)

        async def acall():
            return await _rpc.acall(conn, "T.total", (arg,), {}, 0.5)

        async_thread, async_box = run_in_thread(asyncio.run, acall())
        for t in (sync_thread, async_thread, fill_thread):
            t.join(3)
        outcome = {name: (box.get("error"), box.get("elapsed"))
                   for name, box in (("fill", fill_box), ("call", sync_box), ("acall", async_box))}
        try:  # release whatever still waits (a failure here has a test of its own below)
            conn.fail(bm.MachineLost(server.addr, "test over"))
        except RuntimeError:
            pass
        for t in (sync_thread, async_thread, fill_thread):
            t.join(10)
    for name, (error, elapsed) in outcome.items():
        assert elapsed is not None, (f"{name} with a timeout was still blocked after 3 s "
                                     f"(flow control ignores the call's deadline): {outcome}")
        assert isinstance(error, TimeoutError), outcome
        assert elapsed < 1.5, outcome


def test_connection_closes_cleanly_after_an_async_sender_gave_up():
    """An acall that timed out while waiting for room in the send queue, from
    an asyncio.run() that has since returned (its loop is closed): closing
    the connection later must still close it, and fail the calls on it."""
    creds = Credentials.generate()
    with RawServer(creds, never_read) as server, client_node(creds) as node:
        conn = node.connect(server.addr, timeout=5)
        fill_thread, _ = _fill_send_queue(conn)

        arg = np.ones(8 << 20, np.uint8)  # large enough to wait for room under any policy

        async def acall():
            return await _rpc.acall(conn, "T.total", (arg,), {}, 0.3)

        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(acall(), 5))
        waiting_thread, waiting_box = run_in_thread(_rpc.call, conn, "T.square", (3,), {}, 30)
        time.sleep(0.1)
        conn.fail(bm.MachineLost(server.addr, "closed by the test"))  # must not raise
        waiting_thread.join(5)
        fill_thread.join(5)
        assert isinstance(waiting_box.get("error"), bm.MachineLost), waiting_box
        assert server.sock is not None and closed_within(server.sock, 1.0) < 1.0


# ---- the in-flight gate --------------------------------------------------------------


def test_callers_beyond_the_in_flight_limit_wait_then_all_finish(local):
    b, m = local
    with client_node(b.node.creds) as node:
        conn = node.connect(m.addr, timeout=5)
        conn.gate.limit = 3
        m.call("T.reset_peak", timeout=10)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: _rpc.call(conn, "T.held", (0.1,), {}, 20), range(12)))
        assert results == [True] * 12
        assert m.call("T.get_peak", timeout=10) == 3

        m.call("T.reset_peak", timeout=10)

        async def go():
            return await asyncio.gather(*(_rpc.acall(conn, "T.held", (0.1,), {}, 20)
                                          for _ in range(12)))

        assert asyncio.run(asyncio.wait_for(go(), 30)) == [True] * 12
        assert m.call("T.get_peak", timeout=10) == 3
        assert conn.gate.used == 0 and not conn.closed


# ---- cancellation ---------------------------------------------------------------------


def test_deadline_cancels_sync_and_async_work_on_the_callee(local):
    b, m = local
    with pytest.raises(TimeoutError):
        m.call("Echo.wait_cancel", "t-sync", timeout=0.3)
    poll(lambda: m.call("Echo.event", "t-sync", timeout=10) == "cancelled")

    async def go():
        with pytest.raises(TimeoutError):
            await m.acall("Echo.await_cancel", "t-async", timeout=0.3)
        task = asyncio.ensure_future(m.acall("Echo.wait_cancel", "t-task", timeout=30))
        while await m.acall("Echo.event", "t-task", timeout=10) != "started":
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(go(), 20))
    poll(lambda: m.call("Echo.event", "t-async", timeout=10) == "CancelledError")
    poll(lambda: m.call("Echo.event", "t-task", timeout=10) == "cancelled")
    poll(lambda: m.stats()["open_calls"] == 1)


# ---- malformed frames from an authenticated peer ---------------------------------------


def _inline_msg(sid: int, mtype: int, payload: bytes, mflags: int = 0) -> bytes:
    body = struct.pack("<BBHI", mtype, mflags, 0, 1) + struct.pack("<Q", len(payload)) + payload
    return HEADER.pack(MSG, _wire.FLAG_INLINE, 0, sid, len(body)) + body


MUTATIONS = {
    "random bytes": bytes([0xEE]) + random.Random(7).randbytes(4095),
    "unknown frame kind": HEADER.pack(9, 0, 0, 1, 0),
    "frame kind 0": HEADER.pack(0, 0, 0, 1, 0),
    "frame length 2**40": HEADER.pack(MSG, 0, 0, 1, 1 << 40),
    "reserved bits set": HEADER.pack(PING, 0, 0xBEEF, 0, 8) + bytes(8),
    "DATA with no message": HEADER.pack(DATA, 0, 0, 1, 4) + b"abcd",
    "DATA longer than its message": (
        HEADER.pack(MSG, 0, 0, 1, 16) + struct.pack("<BBHIQ", 1, 0, 0, 1, 100)
        + HEADER.pack(DATA, 0, 0, 1, 200) + bytes(200)),
    "unknown message type": _inline_msg(1, 99, b"x"),
    "request on the server's stream ids": message_bytes(2, _wire.MTYPE_REQUEST, ("Echo.echo", (1,), {})),
    "PING of 4 bytes": HEADER.pack(PING, 0, 0, 0, 4) + bytes(4),
    "CANCEL on stream 0": HEADER.pack(CANCEL, 0, 0, 0, 0),
    "65537 segments": HEADER.pack(MSG, 0, 0, 1, 8) + struct.pack("<BBHI", 1, 0, 0, 65537),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_malformed_frame_closes_only_that_connection(local, name):
    b, m = local
    pid = m.call("T.pid", timeout=10)
    sock = raw_connect(m.addr, b.node.creds)
    try:
        assert raw_call(sock, 1, "Echo.echo", "before") == "before"  # a working connection
        sock.sendall(MUTATIONS[name])
        closed_within(sock, 1.0)
    finally:
        sock.close()
    # the machine lives on, the driver's connection works, a new one works
    assert m.state == bm.State.RUNNING
    assert m.call("T.pid", timeout=10) == pid
    fresh = raw_connect(m.addr, b.node.creds)
    try:
        assert raw_call(fresh, 1, "Echo.echo", name) == name
    finally:
        fresh.close()


def test_undecodable_request_fails_that_call_only(local):
    b, m = local
    sock = raw_connect(m.addr, b.node.creds)
    try:
        sock.sendall(_inline_msg(1, _wire.MTYPE_REQUEST, b"\x80\x05this is no pickle"))
        with pytest.raises(Exception):
            raw_reply(sock, 1)  # an error reply, not a closed connection
        assert raw_call(sock, 3, "Echo.echo", "still here") == "still here"
    finally:
        sock.close()


def test_late_reply_to_a_cancelled_call_is_dropped():
    """A peer that replies after we cancelled: the reply is discarded, the
    connection and later calls are unaffected."""
    creds = Credentials.generate()
    state: dict = {}

    def serve(sock: socket.socket, stop: threading.Event) -> None:
        decoder = _decoder.Decoder()
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for event in decoder.feed(data):
                if event[0] == MSG and event[2] == _wire.MTYPE_REQUEST:
                    method, args, kwargs = loads(event[4])
                    if method == "X.slow":
                        state["slow"] = event[1]  # no reply yet
                    else:
                        sock.sendall(message_bytes(event[1], _wire.MTYPE_REPLY, args[0]))
                elif event[0] == CANCEL:
                    state["cancelled"] = event[1]
                    sock.sendall(message_bytes(event[1], _wire.MTYPE_REPLY, "stale"))
                    state["stale sent"] = True

    with RawServer(creds, serve) as server, client_node(creds) as node:
        conn = node.connect(server.addr, timeout=5)
        with pytest.raises(TimeoutError):
            _rpc.call(conn, "X.slow", (), {}, 0.2)
        poll(lambda: state.get("stale sent"), timeout=5)
        assert state["cancelled"] == state["slow"]
        time.sleep(0.1)  # the stale reply has arrived by now
        assert _rpc.call(conn, "X.echo", ("fresh",), {}, 5) == "fresh"
        assert not conn.closed and not conn.calls


# ---- call-level faults stay call-level ------------------------------------------------------


def test_unpicklable_reply_fails_that_call_only(local):
    b, m = local
    conn = m.connection(10)
    with pytest.raises(bm.Error, match="pickle"):
        m.call("T.lock_reply", timeout=10)
    assert m.call("T.square", 4, timeout=10) == (4, 17)
    with pytest.raises(ValueError, match="boom"):
        m.call("Echo.fail_value", "boom", timeout=10)
    assert m.call("T.square", 5, timeout=10) == (5, 26)
    # an argument the machine cannot unpickle, a reply we cannot unpickle
    with pytest.raises(RuntimeError, match="refuses"):
        m.call("Echo.echo", Unloadable(), timeout=10)
    with pytest.raises(Exception, match="refuses"):
        m.call("T.unloadable_reply", timeout=10)
    # a stream item that cannot be pickled ends that stream only
    items = []
    with pytest.raises(bm.Error, match="pickle"):
        for x in m.stream("T.items_then_lock", timeout=10):
            items.append(x)
    assert items == [1]
    assert m.call("T.square", 6, timeout=10) == (6, 37)
    assert m._conn is conn and not conn.closed
    assert m.state == bm.State.RUNNING


# ---- handshakes with the wrong peers ------------------------------------------------------


@pytest.mark.parametrize("greeting", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n",
    bytes([0x17]) + random.Random(3).randbytes(255),
], ids=["http", "ssh", "random"])
def test_foreign_protocols_are_dropped_at_once(local, greeting):
    b, m = local
    with connect(m.addr, timeout=5) as sock:
        sock.sendall(greeting)
        elapsed = closed_within(sock, 1.0)
    assert elapsed < 0.1, f"dropped after {elapsed * 1e3:.0f} ms"
    assert m.call("T.square", 2, timeout=10) == (2, 5)


def test_wrong_secret_or_cluster_is_auth_error(local):
    b, m = local
    wrong_secret = Credentials(b.node.creds.cluster_id, os.urandom(32))
    for creds in (wrong_secret, Credentials.generate()):
        with client_node(creds, "intruder") as node:
            with pytest.raises(bm.AuthError):
                node.connect(m.addr, timeout=5)
            assert not node.connections
    assert m.call("T.square", 3, timeout=10) == (3, 10)


def test_wrong_protocol_version_is_protocol_error_naming_both(local, monkeypatch):
    b, m = local  # the machine is another process: only our side speaks version + 1
    theirs = _auth.VERSION
    ours = theirs + 1
    monkeypatch.setattr(_auth, "VERSION", ours)
    with client_node(b.node.creds, "future") as node:
        with pytest.raises(bm.ProtocolError) as info:
            node.connect(m.addr, timeout=5)
    text = str(info.value)
    assert f"version {theirs}" in text and f"speak {ours}" in text, text
    monkeypatch.undo()
    assert m.call("T.square", 3, timeout=10) == (3, 10)
