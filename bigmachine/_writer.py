"""The write scheduler of a connection: direct writes, then round-robin by stream.

Writes may come from any thread. When nothing is queued the sender's thread
writes the frames itself (no thread hop, ``sendmsg`` scatter-gather with
MSG_DONTWAIT); otherwise they join a per-stream queue that the node's IO loop
drains round-robin, one frame at a time, so a small message is never stuck
behind a large transfer. Large senders wait for room under ``max_queued``
bytes (flow control); small ones never wait (the in-flight gate bounds them).
With TLS, frames are encrypted one at a time and ciphertext the socket did
not take waits for the next write. A thread may cork the writer: its small
messages then wait until it uncorks and go out together, one ``sendmsg``
for a batch of replies or of an event loop's requests (CORK_FLUSH at most,
so that the peer works on the first while the rest are made). A message may carry
descriptors (shared-memory segments, Unix sockets only): they go with the
first ``sendmsg`` that writes any of its bytes, which starts at its MSG frame,
and are closed here once sent or dropped.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from threading import get_ident
from typing import Any, Callable, Optional

from . import _faults, _wire
from ._sockio import IOV_MAX, send_buffers
from ._waiters import wake_threadsafe

MAX_QUEUED = 64 << 20           # bytes queued for writing before large senders wait
SMALL_MESSAGE = _wire.INLINE_MAX  # messages this small never wait for room
# A sender writes at most this many frames (about 2 MiB) itself; the IO loop
# writes the rest, round-robin between streams.
DIRECT_FRAMES = 3
# Frames the IO loop writes per wake-up before it lets go of the lock, so a
# small message never waits behind more than a few MiB of someone's transfer.
WRITE_BUDGET = 4
# Corked messages go out this many at a time, not all at uncork: the peer starts
# on the first ones while this side makes the rest (both ends of a pipelining
# caller work at once instead of taking turns; 100 acalls in flight: +25% calls/s).
CORK_FLUSH = 16
_CORKED = -1  # the queue key of corked messages written together (no stream has it)


class _Outgoing:
    """A message being written: its frames, and where the writer is in them."""

    __slots__ = ("units", "index", "offset", "nbytes", "sent", "fds")

    def __init__(self, units: list, nbytes: int, fds: Optional[list] = None):
        self.units = units
        self.index = 0
        self.offset = 0  # bytes of units[index] already written
        self.nbytes = nbytes
        self.sent = 0    # bytes of the message written (or, with TLS, encrypted)
        self.fds = fds   # descriptors not yet sent (ours to close)

    def wrote(self, n: int) -> None:
        """n bytes (n > 0) of the message left: its descriptors went with the first."""
        self.offset += n
        self.sent += n
        if self.fds and n:
            self.release()

    def release(self) -> None:
        """Close the descriptors (sent, or never to be)."""
        fds, self.fds = self.fds, None
        _close(fds)


def _close(fds: Optional[list]) -> None:
    for fd in fds or ():
        os.close(fd)


class Writer:
    """Writes the frames of many streams to one socket, fairly and with bounded memory.

    io_failed(what, exc) turns a socket error into the connection's failure
    and returns what to raise; lost() is what a send on a closed writer raises.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, tls: Any,
                 io_failed: Callable[[str, BaseException], BaseException],
                 lost: Callable[[], BaseException], max_queued: int = MAX_QUEUED):
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.tls = tls                    # a _tls.TLSChannel, or None
        self.io_failed = io_failed
        self.lost = lost
        self.max_queued = max_queued
        self.queued = 0                   # bytes queued and not yet written
        self.bytes_sent = 0               # of message frames (before TLS), for progress
        self.closed = False
        self._ciphertext: Any = b""       # encrypted bytes not yet written
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._async_drained: list = []
        self._streams: OrderedDict[int, deque] = OrderedDict()
        self._armed = False
        self._cork_owner: Optional[int] = None  # the thread whose small messages wait for uncork
        self._corked: list = []           # their buffers, in order
        self._corked_bytes = 0
        self._corked_count = 0            # and how many messages they are
        self._corked_sids: set = set()    # and their streams
        # Streams with a message in the corked batches' queue: their next ones
        # queue there too, behind it, not in a queue of their own.
        self._behind_corked: set = set()

    # ---- flow control -----------------------------------------------------

    def wait_for_room(self, deadline: Optional[float], what: str) -> None:
        """Block until at most max_queued bytes wait; TimeoutError at deadline (monotonic)."""
        with self._lock:
            while self.queued > self.max_queued and not self.closed:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"{what} is not reading; send queue full")
                self._drained.wait(wait)

    async def await_room(self) -> None:
        """The asyncio form of wait_for_room, without a deadline (callers use wait_for)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self.queued <= self.max_queued or self.closed:
                    return
                waiter = (loop, loop.create_future())
                self._async_drained.append(waiter)
            try:
                await waiter[1]
            finally:
                with self._lock:
                    if waiter in self._async_drained:
                        self._async_drained.remove(waiter)

    def _wake_senders(self) -> None:
        """With the lock held: wake senders waiting for room, if there is room."""
        if self.queued <= self.max_queued or self.closed:
            self._drained.notify_all()
            for loop, fut in self._async_drained:
                wake_threadsafe(loop, fut)
            self._async_drained.clear()

    # ---- sending ----------------------------------------------------------

    def enqueue(self, sid: int, units: list, nbytes: int, cork: bool = False,
                fds: Optional[list] = None) -> None:
        """Write now if nothing is queued, else queue for the IO loop to write.

        cork: a small message may wait for uncork() if this thread corked the
        writer (never one with descriptors). fds: descriptors to send with the
        message; the writer owns them from now on.
        """
        if _faults.FAULTS is not None and self._inject(units, fds):
            return
        with self._lock:
            error = self._enqueue(sid, units, nbytes, cork, fds)
        if error is not None:
            raise self.io_failed("write", error)

    def enqueue_in_turn(self, sid: int, units: list, nbytes: int,
                        fds: Optional[list] = None, first_now: bool = False) -> bool:
        """enqueue a small message corked, corking the writer first if nobody has.

        For an event loop's messages, which go out together when its turn
        ends: True if this call corked, and the caller must then have
        uncork() run at the end of the turn. One lock where cork() and
        enqueue() take two. A message with descriptors is not corked: it
        goes out at once, after what this thread corked. first_now: the
        message that corks goes out at once (nothing is corked before it),
        the rest of the turn's wait.
        """
        if _faults.FAULTS is not None and self._inject(units, fds):
            return False
        with self._lock:
            corked = self._cork_owner is None and not self.closed
            if corked and first_now:
                error = self._send(sid, units, nbytes, fds)  # nothing is corked before it
                self._cork_owner = get_ident()
            else:
                if corked:
                    self._cork_owner = get_ident()
                error = self._enqueue(sid, units, nbytes, True, fds)
        if error is not None:
            raise self.io_failed("write", error)
        return corked

    def _enqueue(self, sid: int, units: list, nbytes: int, cork: bool,
                 fds: Optional[list]) -> Optional[OSError]:
        """With the lock held: enqueue's work; the error if one."""
        if self.closed:
            _close(fds)
            raise self.lost()
        owner = self._cork_owner
        if owner is None or owner != get_ident():
            return self._send(sid, units, nbytes, fds)
        # Not behind a message of its own stream still queued: the corked
        # batch has a queue of its own, written in turn with the streams',
        # and a stream's messages must not overtake.
        if cork and not fds and len(units) == 1 and nbytes <= SMALL_MESSAGE \
                and sid not in self._streams:
            self._corked.extend(units[0])
            self._corked_bytes += nbytes
            self._corked_count += 1
            self._corked_sids.add(sid)
            if self._corked_count < CORK_FLUSH:
                return None
            return self._unplug()
        error = self._unplug()  # what this thread corked goes first
        if error is not None:
            _close(fds)
            return error
        return self._send(sid, units, nbytes, fds)

    def cork(self) -> bool:
        """Hold this thread's small corkable messages until it calls uncork().

        False if this thread or another already holds the cork (then only the
        first uncork() counts, or messages go out as usual).
        """
        with self._lock:
            if self._cork_owner is not None:
                return False
            self._cork_owner = get_ident()
            return True

    def uncork(self, anyone: bool = False) -> None:
        """Write what this thread corked, in one sendmsg where it can.

        anyone: whichever thread corked (one that runs too long to hold its messages).
        """
        with self._lock:
            if self._cork_owner is None or not (anyone or self._cork_owner == get_ident()):
                return
            self._cork_owner = None
            error = self._unplug()
        if error is not None:
            self.io_failed("write", error)

    def _unplug(self) -> Optional[OSError]:
        """With the lock held: send what was corked, as one message."""
        if not self._corked:
            return None
        buffers, nbytes, sids = self._take_corked()
        if self.closed:
            return None
        units = [buffers[i:i + IOV_MAX] for i in range(0, len(buffers), IOV_MAX)]
        error = self._send(_CORKED, units, nbytes)
        if _CORKED in self._streams:  # queued, not written: its streams wait behind it
            self._behind_corked |= sids
        return error

    def _take_corked(self) -> tuple[list, int, set]:
        """With the lock held: what is corked (buffers, bytes, streams); the cork empty."""
        taken = self._corked, self._corked_bytes, self._corked_sids
        self._corked, self._corked_bytes, self._corked_count, self._corked_sids = [], 0, 0, set()
        return taken

    def _send(self, sid: int, units: list, nbytes: int, fds: Optional[list] = None) -> Optional[OSError]:
        """With the lock held: write now if nothing is queued, else queue; the error if one.

        fds are the writer's from now on: sent, queued, or closed.
        """
        out = None
        if not self._streams:
            try:
                if len(units) == 1 and len(units[0]) <= IOV_MAX and self.tls is None:  # one frame
                    sent = send_buffers(self.sock, units[0], fds, socket.MSG_DONTWAIT)
                    self.bytes_sent += sent
                    if sent == nbytes:  # the usual small message: nothing to keep
                        if fds:
                            _close(fds)
                        return None
                    out = _Outgoing(units, nbytes, fds)
                    if sent:
                        out.wrote(sent)
                elif len(units) == 1 and self.tls is not None and not self._ciphertext:
                    self._send_tls(units[0], nbytes)  # one frame: no _Outgoing
                    return None
                else:
                    out = _Outgoing(units, nbytes, fds)
                if self._write(out, DIRECT_FRAMES):
                    return None
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if out is None:
                    _close(fds)
                else:
                    out.release()
                return exc
        if out is None:
            out = _Outgoing(units, nbytes, fds)
        if sid in self._behind_corked:
            sid = _CORKED
        queue = self._streams.get(sid)
        if queue is None:
            self._streams[sid] = queue = deque()
        queue.append(out)
        self.queued += out.nbytes - out.sent
        self._arm()
        return None

    def drop_unsent(self, sid: int) -> None:
        """Forget sid's queued messages that have not begun (a begun one must finish)."""
        with self._lock:
            queue = self._streams.get(sid)
            if not queue:
                return
            keep = deque(out for out in queue if out.sent)
            for out in queue:
                if not out.sent:
                    self.queued -= out.nbytes
                    out.release()
            if keep:
                self._streams[sid] = keep
            else:
                del self._streams[sid]
            self._wake_senders()

    def add_ciphertext(self, data: bytes) -> None:
        """Queue ciphertext that reading produced, behind whatever is being written."""
        with self._lock:
            if data and not self.closed:
                self._ciphertext = memoryview(bytes(self._ciphertext) + data)
                self._arm()

    def _inject(self, units: list, fds: Optional[list]) -> bool:
        """Apply the fault injector to one message; True if it was consumed. Its
        descriptors are closed then, and when the fault raises."""
        fault = _faults.FAULTS.choose()
        if fault == _faults.DROP:
            _close(fds)
            return True
        if fault == _faults.TRUNCATE:
            _close(fds)
            with self._lock:
                # Half a header, unless another message is part-written: then
                # writing anything would corrupt that one, not this one.
                if not self.closed and not self._streams and not self._ciphertext:
                    try:
                        self.sock.send(bytes(memoryview(units[0][0])[:8]), socket.MSG_DONTWAIT)
                    except OSError:
                        pass
            raise self.io_failed("write", ConnectionAbortedError("fault injected: truncated write"))
        return False

    # ---- writing, with the lock held ----------------------------------------

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            self.loop.call_soon_threadsafe(self._arm_on_loop)

    def _arm_on_loop(self) -> None:
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
                    n = send_buffers(sock, batch, out.fds, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return False
                out.wrote(n)
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

    def _send_tls(self, unit: list, nbytes: int) -> None:
        """With the lock held and nothing queued: encrypt one frame and write what
        the socket takes; the rest waits in _ciphertext for the IO loop."""
        data = self.tls.encrypt(unit)
        self.bytes_sent += nbytes
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self._ciphertext = memoryview(data)[sent:]
            self._arm()

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
        """On the IO loop: drain queued messages round-robin by stream, a frame at a time."""
        with self._lock:
            try:
                self._drain()
            except OSError as exc:
                error = exc
            else:
                self._wake_senders()
                if not self._streams and not self._ciphertext:
                    self._disarm()
                return
            self._disarm()
        self.io_failed("write", error)

    def _drain(self) -> None:
        if not self._flush_ciphertext():
            return
        budget = WRITE_BUDGET
        while self._streams and budget > 0:
            budget -= 1
            sid, queue = next(iter(self._streams.items()))
            out = queue[0]
            before, sent = out.index, out.sent
            done = self._write(out, 1)
            self.queued -= out.sent - sent
            if done:
                queue.popleft()
                self.queued -= out.nbytes - out.sent  # whatever framing was not counted
                if not queue:
                    del self._streams[sid]
                    if sid == _CORKED:
                        self._behind_corked.clear()
                    continue
            elif out.index == before:  # the socket is full
                break
            self._streams.move_to_end(sid)

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self.loop.remove_writer(self.fd)

    # ---- closing ------------------------------------------------------------

    def close(self) -> None:
        """Stop writing, drop what is queued and shut the socket down (which wakes
        its reader). Once only."""
        with self._lock:
            self.closed = True
            for queue in self._streams.values():
                for out in queue:
                    out.release()
            self._streams.clear()
            self._behind_corked.clear()
            self._take_corked()
            self.queued = 0
            self._wake_senders()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.loop.call_soon_threadsafe(self._release_fd)
        except RuntimeError:
            self.sock.close()  # the loop is gone: nothing watches the fd

    def _release_fd(self) -> None:
        with self._lock:
            self._disarm()
        self.sock.close()


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
