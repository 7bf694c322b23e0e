"""One authenticated TCP connection carrying many calls in both directions.

A reader thread of the connection's own blocks in ``recv_into`` and decodes
frames (``_wire.Decoder``), writing bulk data straight into its final buffers
and waking callers directly; it never waits on an event loop, so a reply
reaches its caller with one thread wake-up. Writes may come from any thread:
when nothing is queued the caller's thread writes the frames itself (no thread
hop); otherwise they join a per-stream queue that the node's IO loop drains
round-robin, one frame at a time, so a small call is never stuck behind a
large transfer.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

from . import _buffers, _wire
from ._wire import (KIND_CANCEL, KIND_CREDIT, KIND_GOAWAY, KIND_MSG, KIND_PING,
                    KIND_PONG, MTYPE_END, MTYPE_ERROR, MTYPE_REPLY,
                    MTYPE_REQUEST, WireError)
from .errors import Error, MachineLost, ProtocolError

log = logging.getLogger("bigmachine.connection")

IOV_MAX = 1024
MAX_IN_FLIGHT = 10_000          # outgoing calls in flight per connection
MAX_QUEUED = 64 << 20           # bytes queued for writing before large senders wait
SMALL_MESSAGE = _wire.INLINE_MAX  # messages this small never wait for room
# A sender writes at most this many frames (about 2 MiB) itself; the IO loop
# writes the rest, round-robin between streams.
DIRECT_FRAMES = 3
# Frames the IO loop writes per wake-up before it lets go of the lock, so a
# small message never waits behind more than a few MiB of someone's transfer.
WRITE_BUDGET = 4
# Kernel socket buffers on local links. Left to autotuning they grow to tens
# of MiB on loopback, and a ping queued behind them waits for all of it;
# 1 MiB keeps bulk speed (bench/bulk.py) and bounds that wait. Links with a
# larger bandwidth-delay product (SSH hosts) pass 0: the kernel's autotuning.
SOCKET_BUFFER = 1 << 20
KEEPALIVE_HISTORY = 60  # keepalive round trips remembered per connection, for status


class FaultInjector:
    """Test-only: drop or truncate outgoing messages at random.

    Enabled by the environment variable BIGMACHINE_FAULTS, e.g.
    ``drop=0.005,truncate=0.01,seed=1`` (machines inherit it). A dropped
    message is never written (its caller waits for its deadline); a truncated
    one is written in part and then the connection is cut, as when a peer
    dies mid-write.
    """

    def __init__(self, spec: str):
        fields = dict(part.split("=", 1) for part in spec.split(",") if part)
        self.drop = float(fields.get("drop", 0))
        self.truncate = float(fields.get("truncate", 0))
        self.rng = random.Random(int(fields["seed"]) + os.getpid() if "seed" in fields else None)

    def choose(self) -> str:
        x = self.rng.random()
        if x < self.drop:
            return "drop"
        if x < self.drop + self.truncate:
            return "truncate"
        return ""


FAULTS = FaultInjector(os.environ["BIGMACHINE_FAULTS"]) if os.environ.get("BIGMACHINE_FAULTS") else None


def configure_socket(sock: socket.socket, user_timeout: float, buffer: int = SOCKET_BUFFER) -> None:
    """Low latency, and a bound on how long a silent peer can hold a call.

    buffer: kernel send and receive buffer bytes; 0 leaves them to autotuning.
    """
    if buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    if sock.family == socket.AF_UNIX:
        return  # the rest is TCP's
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(user_timeout / 3)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class Waiter:
    """Delivers a call's replies from the connection's reader to its caller.

    The reader calls ``put``; a thread caller blocks in ``get`` on a plain
    lock (the cheapest cross-thread wake-up), an asyncio caller awaits
    ``aget`` on its own loop.
    """

    __slots__ = ("items", "lock", "loop", "future")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.lock = threading.Lock()
        self.lock.acquire()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.future: Optional[asyncio.Future] = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        fut = self.future
        if fut is not None:
            self.future = None
            call_soon_threadsafe(self.loop, _wake, fut)
        elif self.lock.locked():
            try:
                self.lock.release()
            except RuntimeError:
                pass

    def get(self, timeout: Optional[float]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.items:
            wait = -1 if deadline is None else max(deadline - time.monotonic(), 0)
            if not self.lock.acquire(timeout=wait) and not self.items:
                raise TimeoutError
        return self.items.popleft()

    async def aget(self) -> Any:
        while not self.items:
            self.loop = asyncio.get_running_loop()
            fut = self.loop.create_future()
            self.future = fut
            if self.items:  # put() ran before the future was visible
                self.future = None
                break
            await fut
        return self.items.popleft()


_batch = threading.local()  # .pending: {loop: [(callback, args)]} while a reader dispatches


def call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable, *args: Any) -> None:
    """loop.call_soon_threadsafe, batched per loop while a reader dispatches a read's events.

    One wake-up of a loop then carries every reply and request of that read
    for it, instead of one wake-up (a write to its self-pipe) each.
    """
    pending = getattr(_batch, "pending", None)
    if pending is None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: whoever waited on it is gone
    else:
        pending.setdefault(loop, []).append((callback, args))


def _run_batch(items: list) -> None:
    for callback, args in items:
        callback(*args)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_threadsafe(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> bool:
    """Wake fut on its loop, unless it is done or its loop is gone; True if woken."""
    if fut.done():
        return False
    try:
        loop.call_soon_threadsafe(_wake, fut)
    except RuntimeError:
        return False  # the loop is closed: its caller gave up
    return True


class Gate:
    """Counts calls in flight; callers beyond the limit wait their turn."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition(threading.Lock())
        self.async_waiters: deque = deque()

    def acquire(self, timeout: Optional[float]) -> None:
        with self.cond:
            if self.used >= self.limit:
                if not self.cond.wait_for(lambda: self.used < self.limit, timeout):
                    raise TimeoutError("too many calls in flight")
            self.used += 1

    async def aacquire(self) -> None:
        while True:
            with self.cond:
                if self.used < self.limit:
                    self.used += 1
                    return
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self.async_waiters.append((loop, fut))
            try:
                await fut
            except asyncio.CancelledError:
                with self.cond:
                    if (loop, fut) in self.async_waiters:
                        self.async_waiters.remove((loop, fut))
                    elif self.used < self.limit:
                        self._wake_next()  # we were handed the turn: pass it on
                raise

    def release(self) -> None:
        with self.cond:
            self.used -= 1
            self.cond.notify()
            self._wake_next()

    def _wake_next(self) -> None:
        """With cond held: wake the first async waiter whose loop still runs."""
        while self.async_waiters:
            loop, fut = self.async_waiters.popleft()
            if _wake_threadsafe(loop, fut):
                break


class _Outgoing:
    """A message being written: its frames, and where the writer is in them."""

    __slots__ = ("units", "index", "offset", "nbytes", "sent")

    def __init__(self, units: list, nbytes: int):
        self.units = units
        self.index = 0
        self.offset = 0  # bytes of units[index] already written
        self.nbytes = nbytes
        self.sent = 0    # bytes of the message written (or, with TLS, encrypted)


class Connection:
    """A multiplexed connection. Create it on its IO loop after the handshake."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, peer: str,
                 initiator: bool, on_request: Callable, on_close: Callable,
                 max_in_flight: int = MAX_IN_FLIGHT, max_queued: int = MAX_QUEUED,
                 max_message: int = _wire.MAX_MESSAGE, tls: Any = None, node: Any = None,
                 addr_key: Optional[str] = None, peer_name: Optional[str] = None):
        self.sock = sock
        self.node = node                  # the node this connection belongs to (replies unpickle in it)
        self.addr_key = addr_key          # the address we dialled, or None if the peer dialled us
        self.peer_name = peer_name        # the member's name, when we dialled it
        self.tls = tls                    # a _tls.TLSChannel, or None for plain TCP
        self._ciphertext = b""            # encrypted bytes not yet written
        self.fd = sock.fileno()
        self.loop = loop
        self.peer = peer
        self.on_request = on_request      # (conn, sid, mflags, segments), on the reader thread
        self.on_close = on_close          # (conn), once, on whichever thread saw the failure
        # At most four maximal messages may be arriving at once.
        self.decoder = _wire.Decoder(alloc=_buffers.aligned, max_message=max_message,
                                     max_pending=4 * max_message)
        # Our calls use odd ids if we connected, even ones if we accepted.
        self._parity = 1 if initiator else 0
        self._sids = itertools.count(2 - self._parity, 2)
        self.calls: dict[int, Waiter] = {}       # our calls awaiting replies
        self.incoming: dict[int, Any] = {}       # calls we serve, for cancel and credit
        self._cancelled_early: set[int] = set()
        self.gate = Gate(max_in_flight)
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._async_drained: list = []
        self._streams: OrderedDict[int, deque] = OrderedDict()
        self._queued = 0
        self._writer_armed = False
        self.error: Optional[BaseException] = None
        self.closed = False
        self.last_recv = time.monotonic()
        self.pong_at = 0.0
        self.keepalive_rtts: deque = deque(maxlen=KEEPALIVE_HISTORY)  # seconds, oldest first
        self.bytes_sent = 0      # of message frames (before TLS), for progress
        self.bytes_received = 0  # off the socket
        sock.setblocking(True)  # the reader blocks; writers pass MSG_DONTWAIT
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name=f"bigmachine-read-{peer}")
        self.reader.start()

    def __repr__(self) -> str:
        return f"<Connection to {self.peer}{' closed' if self.closed else ''}>"

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages waiting to be written (for progress)."""
        return self._queued

    # ---- outgoing calls -------------------------------------------------

    def new_call(self) -> tuple[int, Waiter]:
        """Register a call; its replies are delivered to the returned Waiter."""
        if self.closed:
            raise self._lost()
        sid = next(self._sids)
        if sid > _wire.MAX_STREAM_ID:
            raise Error("stream ids exhausted on this connection; dial again")
        waiter = Waiter()
        self.calls[sid] = waiter
        if self.closed:  # lost the race with _fail
            self.calls.pop(sid, None)
            raise self._lost()
        return sid, waiter

    def cancel(self, sid: int) -> None:
        """Forget our call sid and tell the peer to stop working on it.

        A request of ours still queued and not yet begun is dropped: it
        would only cost the peer work and us memory.
        """
        if self.calls.pop(sid, None) is not None and not self.closed:
            self._drop_unsent(sid)
            try:
                self.send_control(KIND_CANCEL, sid)
            except MachineLost:
                pass  # closed meanwhile: the peer drops the call with the connection

    def _drop_unsent(self, sid: int) -> None:
        with self._lock:
            queue = self._streams.get(sid)
            if not queue:
                return
            keep = deque(out for out in queue if out.sent)  # a begun message must finish
            for out in queue:
                if not out.sent:
                    self._queued -= out.nbytes
            if keep:
                self._streams[sid] = keep
            else:
                del self._streams[sid]
            self._wake_senders()

    # ---- writing ----------------------------------------------------------

    def send_control(self, kind: int, sid: int, value: int = 0) -> None:
        frame = _wire.control_frame(kind, sid, value)
        self._enqueue(sid, [[frame]], len(frame))

    def send(self, sid: int, mtype: int, mflags: int, segments: list, readonly: list,
             deadline: Optional[float] = None) -> None:
        """Send a message from any thread.

        A large message first waits (off the IO loop) until fewer than
        max_queued bytes wait to be written, so a peer that stops reading
        cannot make us hold unbounded data; small ones go straight on (the
        in-flight gate bounds them). Raises TimeoutError if still waiting at
        deadline (time.monotonic()); nothing was queued then.
        """
        units, nbytes = _wire.message_frames(sid, mtype, mflags, segments, readonly)
        if nbytes > SMALL_MESSAGE and not self._in_loop():
            with self._lock:
                while self._queued > self.max_queued and not self.closed:
                    wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"{self.peer} is not reading; send queue full")
                    self._drained.wait(wait)
        self._enqueue(sid, units, nbytes)

    async def asend(self, sid: int, mtype: int, mflags: int, segments: list, readonly: list) -> None:
        """Send a message from a coroutine; a large one awaits room first (see send)."""
        units, nbytes = _wire.message_frames(sid, mtype, mflags, segments, readonly)
        if nbytes > SMALL_MESSAGE:
            loop = asyncio.get_running_loop()
            while True:
                with self._lock:
                    if self._queued <= self.max_queued or self.closed:
                        break
                    waiter = (loop, loop.create_future())
                    self._async_drained.append(waiter)
                try:
                    await waiter[1]
                finally:
                    with self._lock:
                        if waiter in self._async_drained:
                            self._async_drained.remove(waiter)
        self._enqueue(sid, units, nbytes)

    def _wake_senders(self) -> None:
        """With the lock held: wake senders waiting for room, if there is room."""
        if self._queued <= self.max_queued or self.closed:
            self._drained.notify_all()
            for loop, fut in self._async_drained:
                _wake_threadsafe(loop, fut)
            self._async_drained.clear()

    def _enqueue(self, sid: int, units: list, nbytes: int) -> None:
        """Write now if nothing is queued, else queue for the IO loop to write."""
        if FAULTS is not None and self._inject(units):
            return
        with self._lock:
            if self.closed:
                raise self._lost()
            out = _Outgoing(units, nbytes)
            if not self._streams:
                try:
                    if self._write(out, DIRECT_FRAMES):
                        return
                except OSError as exc:
                    lost = MachineLost(self.peer, f"write failed: {exc}")
                    threading.Thread(target=self._fail, args=(lost,), daemon=True).start()
                    raise lost from exc
            queue = self._streams.get(sid)
            if queue is None:
                self._streams[sid] = queue = deque()
            queue.append(out)
            self._queued += out.nbytes - out.sent
            if not self._writer_armed:
                self._writer_armed = True
                self.loop.call_soon_threadsafe(self._arm_writer)

    def _inject(self, units: list) -> bool:
        """Apply the fault injector to one message; True if it was consumed."""
        fault = FAULTS.choose()
        if fault == "drop":
            return True
        if fault == "truncate":
            with self._lock:
                # Half a header, unless another message is part-written: then
                # writing anything would corrupt that one, not this one.
                if not self.closed and not self._streams and not self._ciphertext:
                    try:
                        self.sock.send(bytes(memoryview(units[0][0])[:8]), socket.MSG_DONTWAIT)
                    except OSError:
                        pass
            self._fail(MachineLost(self.peer, "fault injected: truncated write"))
            raise self._lost()
        return False

    def _in_loop(self) -> bool:
        return getattr(_thread_loop, "loop", None) is self.loop

    def _arm_writer(self) -> None:
        if not self.closed:
            self.loop.add_writer(self.fd, self._on_writable)

    def _write(self, out: _Outgoing, max_units: int) -> bool:
        """Write up to max_units frames of out, as far as the socket takes them.

        True when all of out is written.
        """
        if self.tls is not None:
            return self._write_tls(out, max_units)
        sock = self.sock
        end = min(len(out.units), out.index + max_units)
        while out.index < end:
            unit = out.units[out.index]
            if out.offset:
                unit = _skip(unit, out.offset)
            while unit:
                batch = unit[:IOV_MAX]
                try:
                    n = sock.sendmsg(batch, (), socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return False
                out.offset += n
                out.sent += n
                self.bytes_sent += n
                unit = _skip(unit, n)
            out.index += 1
            out.offset = 0
        return out.index >= len(out.units)

    def _write_tls(self, out: _Outgoing, max_units: int) -> bool:
        """Encrypt a frame at a time; ciphertext the socket did not take waits in _ciphertext."""
        encrypted = 0
        while self._flush_ciphertext():
            if out.index >= len(out.units):
                return True
            if encrypted >= max_units:
                return False
            unit = out.units[out.index]
            self._ciphertext = memoryview(self.tls.encrypt(unit))
            n = sum(memoryview(b).nbytes for b in unit)
            out.sent += n
            self.bytes_sent += n
            out.index += 1
            encrypted += 1
        return False

    def _flush_ciphertext(self) -> bool:
        """Write pending ciphertext; True once none is left."""
        while self._ciphertext:
            try:
                n = self.sock.send(self._ciphertext, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            self._ciphertext = self._ciphertext[n:]
        return True

    def _on_writable(self) -> None:
        """Drain queued messages round-robin by stream, one frame at a time."""
        with self._lock:
            try:
                if not self._flush_ciphertext():
                    return
                budget = WRITE_BUDGET
                while self._streams and budget > 0:
                    budget -= 1
                    sid, queue = next(iter(self._streams.items()))
                    out = queue[0]
                    before, sent = out.index, out.sent
                    done = self._write(out, 1)
                    self._queued -= out.sent - sent
                    if done:
                        queue.popleft()
                        self._queued -= out.nbytes - out.sent  # whatever framing was not counted
                        if not queue:
                            del self._streams[sid]
                            continue
                    elif out.index == before:  # the socket is full
                        break
                    self._streams.move_to_end(sid)
            except OSError as exc:
                self.loop.call_soon(self._fail, MachineLost(self.peer, f"write failed: {exc}"))
                self._writer_armed = False
                self.loop.remove_writer(self.fd)
                return
            self._wake_senders()
            if not self._streams and not self._ciphertext:
                self._writer_armed = False
                self.loop.remove_writer(self.fd)

    # ---- reading ----------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = self.decoder
        sock = self.sock
        tls = self.tls
        try:
            while True:
                if tls is None:
                    n = sock.recv_into(decoder.get_buffer())
                else:
                    n = tls.read_into(sock, decoder.get_buffer())
                    if tls.outgoing.pending:
                        self._flush_tls_output()
                if n == 0:
                    self._fail(MachineLost(self.peer, "connection closed by peer"))
                    return
                self.bytes_received += n
                self.last_recv = time.monotonic()
                _batch.pending = pending = {}
                try:
                    for event in decoder.buffer_updated(n):
                        self._on_event(event)
                    event = None  # do not hold the last message while waiting for the next
                finally:
                    _batch.pending = None
                    for loop, items in pending.items():
                        call_soon_threadsafe(loop, _run_batch, items)
                if self.closed:
                    return
        except WireError as exc:
            log.warning("closing connection to %s: malformed frame: %s", self.peer, exc)
            err = ProtocolError(f"malformed frame from {self.peer}: {exc}")
            err.__cause__ = exc
            self._fail(err)
        except (OSError, ssl.SSLError) as exc:
            self._fail(MachineLost(self.peer, f"read failed: {exc}"))
        except MachineLost as exc:  # a write the reader made (a PONG, a CREDIT) failed
            self._fail(exc)
        except BaseException as exc:
            # A reader must never die leaving a connection that looks open.
            log.exception("closing connection to %s: its reader failed", self.peer)
            self._fail(MachineLost(self.peer, f"reader failed: {exc!r}"))

    def _flush_tls_output(self) -> None:
        """Queue ciphertext that reading produced, behind whatever is being written."""
        with self._lock:
            data = self.tls.pending_output()
            if data and not self.closed:
                self._ciphertext = memoryview(bytes(self._ciphertext) + data)
                if not self._writer_armed:
                    self._writer_armed = True
                    self.loop.call_soon_threadsafe(self._arm_writer)

    def _on_event(self, event: tuple) -> None:
        kind, sid = event[0], event[1]
        if kind == KIND_MSG:
            mtype = event[2]
            if mtype == MTYPE_REQUEST:
                if sid & 1 == self._parity:
                    self._fail(ProtocolError(f"{self.peer} sent a request on our stream id {sid}"))
                elif sid in self._cancelled_early:
                    self._cancelled_early.discard(sid)
                else:
                    self.on_request(self, sid, event[3], event[4])
                return
            # pop/get, never get-then-del: the caller may give up (and pop) meanwhile.
            if mtype in (MTYPE_REPLY, MTYPE_ERROR, MTYPE_END):
                waiter = self.calls.pop(sid, None)
            else:
                waiter = self.calls.get(sid)
            if waiter is not None:  # else a late reply to a call we gave up on
                waiter.put((mtype, event[4]))
        elif kind == KIND_CANCEL:
            served = self.incoming.get(sid)
            if served is not None:
                served.cancel()
            elif sid in self.decoder.open_streams:
                self._cancelled_early.add(sid)
        elif kind == KIND_CREDIT:
            served = self.incoming.get(sid)
            if served is not None:
                served.credit(event[2])
        elif kind == KIND_PING:
            self.send_control(KIND_PONG, 0, event[2])
        elif kind == KIND_PONG:
            self.pong_at = time.monotonic()
            # The value is our PING's: time.monotonic() in microseconds when sent.
            self.keepalive_rtts.append(self.pong_at - event[2] / 1e6)
        elif kind == KIND_GOAWAY:
            self._fail(MachineLost(self.peer, "peer shut down"))

    # ---- failure and close ------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Close the connection from any thread, failing everything on it."""
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.error = error
            self._streams.clear()
            self._queued = 0
            self._wake_senders()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        except OSError:
            pass
        try:
            self.loop.call_soon_threadsafe(self._release_fd)
        except RuntimeError:
            self.sock.close()  # the loop is gone: nothing watches the fd
        # Owners learn first (a machine is STOPPED), then the waiting callers,
        # whatever the owners' callbacks do.
        try:
            self.on_close(self)
        finally:
            calls, self.calls = self.calls, {}
            for waiter in calls.values():
                waiter.put((None, error))
            for served in list(self.incoming.values()):
                served.cancel()

    def _lost(self) -> MachineLost:
        """What a new call on this closed connection raises."""
        return MachineLost.because(self.peer, self.error)

    def _release_fd(self) -> None:
        if self._writer_armed:
            self.loop.remove_writer(self.fd)
            self._writer_armed = False
        self.sock.close()


_thread_loop = threading.local()  # .loop: the IO loop running on this thread, if any


def mark_loop_thread(loop: asyncio.AbstractEventLoop) -> None:
    """Record that loop runs on the calling thread (so sends there never block)."""
    _thread_loop.loop = loop


def _skip(unit: list, n: int) -> list:
    """The buffers of unit after its first n bytes."""
    i = 0
    while n:
        size = memoryview(unit[i]).nbytes
        if n < size:
            return [memoryview(unit[i])[n:]] + unit[i + 1:]
        n -= size
        i += 1
    return unit[i:]
