"""One authenticated connection carrying many calls in both directions.

The connection owns the calls on it: the ids of ours (odd if we dialled,
even if we accepted), the waiters of our calls, and the calls we serve. Its
reader (``_reader``) decodes frames on a thread of its own and hands each
event to ``_on_event`` here; its writer (``_writer``) schedules the frames of
every stream onto the socket. Any socket error, from either, becomes the
connection's ``MachineLost`` in ``io_failed``, and every call on it fails.
On a Unix socket without TLS, with the session's shared_memory option, large
out-of-band buffers travel as shared memory (``_shmlink``).

What a peer makes us send is bounded as what we send of our own is: a peer
may have at most max_in_flight calls served at once (its in-flight gate's
size; more is a ProtocolError), and while more than max_queued bytes wait
for it to read, the calls it asks for wait to run (``park``), so their
replies are not made; its PINGs are answered only when nothing waits.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from . import _buffers, _decoder, _shmlink, _wire
from ._sockio import Spin, recv_into_with_fds
from ._reader import Reader
from ._waiters import Gate, Waiter, call_soon_threadsafe, on_loop_thread
from ._wire import (KIND_CANCEL, KIND_CREDIT, KIND_GOAWAY, KIND_MSG, KIND_PING,
                    KIND_PONG, MTYPE_END, MTYPE_ERROR, MTYPE_REPLY, MTYPE_REQUEST)
from ._writer import MAX_QUEUED, SMALL_MESSAGE, Writer
from .errors import Error, MachineLost, ProtocolError

MAX_IN_FLIGHT = 10_000          # outgoing calls in flight per connection
KEEPALIVE_HISTORY = 60  # keepalive round trips remembered per connection, for status


class Connection:
    """A multiplexed connection. Create it on its IO loop after the handshake.

    node: the node it belongs to (replies unpickle in it); addr_key: the
    address we dialled, or None if the peer dialled us; peer_name: the
    member's name, when we dialled it.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, peer: str,
                 initiator: bool, on_request: Callable, on_close: Callable,
                 max_in_flight: int = MAX_IN_FLIGHT, max_queued: int = MAX_QUEUED,
                 max_message: int = _wire.MAX_MESSAGE, tls: Any = None, node: Any = None,
                 addr_key: Optional[str] = None, peer_name: Optional[str] = None):
        self.sock = sock
        self.node = node
        self.addr_key = addr_key
        self.peer_name = peer_name
        self.tls = tls                    # a _tls.TLSChannel, or None
        self.loop = loop
        self.peer = peer
        self.on_request = on_request      # (conn, sid, mflags, segments), on the reader thread
        self.on_close = on_close          # (conn), once, on whichever thread saw the failure
        # Our calls use odd ids if we connected, even ones if we accepted.
        self._parity = 1 if initiator else 0
        self._sids = itertools.count(2 - self._parity, 2)
        self.calls: dict[int, Waiter] = {}       # our calls awaiting replies
        self.incoming: dict[int, Any] = {}       # calls we serve, for cancel and credit
        self._cancelled_early: set[int] = set()
        self.gate = Gate(max_in_flight)
        self.max_in_flight = max_in_flight
        self._parked: deque = deque()      # the peer's calls waiting for the writer's room
        self._parking = threading.Lock()
        self._resuming = False
        self._resumer: Optional[asyncio.Task] = None
        self.error: Optional[BaseException] = None
        self._uncork_on: Optional[asyncio.AbstractEventLoop] = None  # the loop an uncork is due on
        self.closed = False
        self._closing = threading.Lock()
        self.pong_at = 0.0
        self.keepalive_rtts: deque = deque(maxlen=KEEPALIVE_HISTORY)  # seconds, oldest first
        sock.setblocking(True)  # the reader blocks; writers pass MSG_DONTWAIT
        # Shared memory needs both ends on this host, on a link that passes descriptors.
        self.shm = (node is not None and node.shared_memory and _shmlink.AVAILABLE
                    and tls is None and sock.family == socket.AF_UNIX)
        self.writer = Writer(sock, loop, tls, self.io_failed, self._lost, max_queued)
        # At most four maximal messages may be arriving at once.
        self.decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=max_message,
                                        max_pending=4 * max_message,
                                        map_shm=_shmlink.map_received if self.shm else None)
        # Its threads run sync methods too: named as the node's pool threads are.
        thread_name = f"bigmachine-{node.name}-read-{peer}" if node is not None else f"bigmachine-read-{peer}"
        spin = Spin(node.busy_poll) if node is not None and node.busy_poll else None
        self.reader = Reader(sock, loop, tls, self.decoder, peer, thread_name, self._on_event, self._is_closed,
                             self._calls_in_flight, self._calls_all_on, self.fail, self.io_failed, self.writer,
                             recv_into_with_fds if self.shm else None, spin)
        self.reader.start()

    def __repr__(self) -> str:
        return f"<Connection to {self.peer}{' closed' if self.closed else ''}>"

    @property
    def last_recv(self) -> float:
        """When bytes last arrived (time.monotonic())."""
        return self.reader.last_recv

    @property
    def bytes_received(self) -> int:
        """Bytes read off the socket (for progress)."""
        return self.reader.bytes_received

    @property
    def bytes_sent(self) -> int:
        """Bytes of message frames written (before TLS), for progress."""
        return self.writer.bytes_sent

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages waiting to be written (for progress)."""
        return self.writer.queued

    def in_loop(self) -> bool:
        """True on the thread of the IO loop this connection writes from."""
        return on_loop_thread(self.loop)

    # ---- outgoing calls -------------------------------------------------

    def new_call(self, lead: bool = False, loop: Optional[asyncio.AbstractEventLoop] = None,
                 stream: bool = False) -> tuple[int, Waiter]:
        """Register a call; its replies are delivered to the returned Waiter.

        lead: the caller will try to read its reply itself (reader.try_lead);
        otherwise someone is made to read: a reader thread, or the loop the
        caller awaits on (loop, an asyncio caller's) if it reads already.
        stream: the call is a stream's (its loop does not read its items).
        """
        if self.closed:
            raise self._lost()
        sid = next(self._sids)
        if sid > _wire.MAX_STREAM_ID:
            raise Error("stream ids exhausted on this connection; dial again")
        waiter = Waiter(stream)
        self.calls[sid] = waiter
        if self.closed:  # lost the race with fail
            self.calls.pop(sid, None)
            raise self._lost()
        if not lead:  # a stream's loop does not read its items: nor those of calls beside it
            self.reader.ensure_reading(None if stream else loop)
        return sid, waiter

    def cancel(self, sid: int) -> None:
        """Forget our call sid and tell the peer to stop working on it.

        A request of ours still queued and not yet begun is dropped: it
        would only cost the peer work and us memory.
        """
        if self.calls.pop(sid, None) is not None and not self.closed:
            self.writer.drop_unsent(sid)
            try:
                self.send_control(KIND_CANCEL, sid)
            except MachineLost:
                pass  # closed meanwhile: the peer drops the call with the connection
            self.reader.call_dropped()  # a caller's loop holding the role for it gives it back

    # ---- writing ----------------------------------------------------------

    def send_control(self, kind: int, sid: int, value: int = 0) -> None:
        frame = _wire.control_frame(kind, sid, value)
        self.writer.enqueue(sid, [[frame]], len(frame))

    def send(self, sid: int, mtype: int, mflags: int, segments: list, readonly: list,
             deadline: Optional[float] = None, cork: bool = False) -> None:
        """Send a message from any thread.

        A large message first waits (off the IO loop) until fewer than
        max_queued bytes wait to be written, so a peer that stops reading
        cannot make us hold unbounded data; small ones go straight on (the
        in-flight gate bounds them). Raises TimeoutError if still waiting at
        deadline (time.monotonic()); nothing was queued then. cork: a small
        message may wait until this thread uncorks the writer (a reply in a
        batch the reader runs; never a request whose reply the thread awaits).
        """
        if not self.shm or len(segments) == 1:  # no descriptors to make: the short way
            units, nbytes = _wire.message_frames(sid, mtype, mflags, segments, readonly)
            fds = None
        else:
            units, nbytes, fds = self._frames(sid, mtype, mflags, segments, readonly)
        if nbytes > SMALL_MESSAGE and not on_loop_thread(self.loop):
            try:
                self.writer.wait_for_room(deadline, self.peer)
            except BaseException:
                _close_all(fds)
                raise
        self.writer.enqueue(sid, units, nbytes, cork, fds)

    async def asend(self, sid: int, mtype: int, mflags: int, segments: list, readonly: list) -> None:
        """Send a message from a coroutine: a large one awaits room first (see
        send), a small one goes out with the rest of the loop's turn (see
        send_in_turn)."""
        units, nbytes, fds = self._frames(sid, mtype, mflags, segments, readonly)
        if nbytes <= SMALL_MESSAGE:
            self._send_in_turn(sid, mtype, units, nbytes, fds)
            return
        try:
            await self.writer.await_room()
        except BaseException:
            _close_all(fds)
            raise
        self.writer.enqueue(sid, units, nbytes, False, fds)

    def send_in_turn(self, sid: int, mtype: int, mflags: int, segments: list, readonly: list,
                     loop: Optional[asyncio.AbstractEventLoop] = None) -> bool:
        """Send a small message of one segment from a coroutine without awaiting;
        False (nothing sent) for any other: await asend.

        The small messages sent in one turn of the running event loop go out
        together, in one sendmsg when the turn ends. No coroutine: each await
        level costs every call that passes through it. loop: the running loop,
        if the caller has it at hand (on Python 3.11 each
        asyncio.get_running_loop() is a getpid system call).
        """
        if len(segments) != 1 or len(segments[0]) > SMALL_MESSAGE:
            return False
        units, nbytes = _wire.message_frames(sid, mtype, mflags, segments, readonly)
        if nbytes > SMALL_MESSAGE:
            return False
        self._send_in_turn(sid, mtype, units, nbytes, None, loop)
        return True

    def _send_in_turn(self, sid: int, mtype: int, units: list, nbytes: int,
                      fds: Optional[list], loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        # The turn's first answer (reply, item, end, error) goes out at once: the
        # peer waits for it, and a turn that answers one call makes no more
        # (an async method's ping: one loop turn less). So does the request of
        # a call made alone (`await m.acall` one at a time: 43.6-47.6 -> 37.1-40.5
        # us). Other requests wait for the turn's end: a caller with calls in
        # flight usually makes more (100 acalls in flight: -15% calls/s when
        # the turn's first went alone, the peer woken for one).
        at_once = mtype != MTYPE_REQUEST or len(self.calls) <= 1
        corked = self.writer.enqueue_in_turn(sid, units, nbytes, fds, at_once)
        if loop is None:
            loop = asyncio.get_running_loop()
        # Also when the cork was already this thread's but no uncork is due on
        # this loop: a loop closed within its turn never ran the one it was given.
        if corked or self._uncork_on is not loop:
            self._uncork_on = loop
            loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        """At the end of a loop's turn: send what it corked (see _send_in_turn)."""
        self._uncork_on = None
        self.writer.uncork()

    def _frames(self, sid: int, mtype: int, mflags: int, segments: list,
                readonly: list) -> tuple[list, int, Optional[list]]:
        """A message's frames, and the descriptors that go with them (shared memory)."""
        shm, fds = _shmlink.outgoing(segments) if self.shm and len(segments) > 1 else (None, None)
        try:
            units, nbytes = _wire.message_frames(sid, mtype, mflags, segments, readonly, shm=shm)
        except BaseException:
            _close_all(fds)
            raise
        return units, nbytes, fds

    # ---- what the peer makes us send ---------------------------------------

    def over_room(self) -> bool:
        """True while more than max_queued bytes wait for the peer to read them."""
        return self.writer.queued > self.writer.max_queued

    def park(self, resume: Callable[[], None]) -> None:
        """Hold a call the peer asked for until over_room() is over, then resume()
        it on the IO loop (resume must not block). From any thread."""
        with self._parking:
            self._parked.append(resume)
            if self._resuming:
                return
            self._resuming = True
        call_soon_threadsafe(self.loop, self._start_resuming)

    def _start_resuming(self) -> None:
        self._resumer = self.loop.create_task(self._resume())  # held: a task is weakly kept

    async def _resume(self) -> None:
        await self.writer.await_room()  # or closed: the calls then end as cancelled
        with self._parking:
            parked, self._parked = self._parked, deque()
            self._resuming = False
        for resume in parked:
            try:
                resume()
            except RuntimeError:  # the node's pool has shut down: so has the connection
                pass

    async def await_room(self) -> None:
        """From a coroutine: wait while over_room()."""
        await self.writer.await_room()

    # ---- reading ----------------------------------------------------------

    def _is_closed(self) -> bool:
        return self.closed

    def _calls_in_flight(self) -> bool:
        return bool(self.calls)

    def _calls_all_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """True if calls are in flight and an asyncio caller on loop awaits each."""
        if not self.calls:
            return False
        try:
            for waiter in self.calls.values():
                if not waiter.awaits_on(loop):
                    return False
        except RuntimeError:  # a call added meanwhile (only uncompiled): not this time
            return False
        return True

    def _on_event(self, event: tuple) -> None:
        kind, sid = event[0], event[1]
        if kind == KIND_MSG:
            mtype = event[2]
            if mtype == MTYPE_REQUEST:
                if sid & 1 == self._parity:
                    self.fail(ProtocolError(f"{self.peer} sent a request on our stream id {sid}"))
                elif sid in self.incoming:  # its call on sid has not ended
                    self.fail(ProtocolError(f"{self.peer} sent a second request on stream id {sid}"))
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
            # Not while anything waits to be written: then either bytes are
            # reaching the peer anyway (it sees us alive) or it is not reading, and
            # queued PONGs would only pile up.
            if self.writer.queued == 0:
                self.send_control(KIND_PONG, 0, event[2])
        elif kind == KIND_PONG:
            self.pong_at = time.monotonic()
            # The value is our PING's: time.monotonic() in microseconds when sent.
            self.keepalive_rtts.append(self.pong_at - event[2] / 1e6)
        elif kind == KIND_GOAWAY:
            self.fail(MachineLost(self.peer, "peer shut down"))

    # ---- failure and close ------------------------------------------------

    def io_failed(self, what: str, exc: BaseException) -> MachineLost:
        """The one place a socket error becomes MachineLost: close the
        connection with it, and return it for the thread that saw it to raise."""
        lost = MachineLost(self.peer, f"{what} failed: {exc}")
        lost.__cause__ = exc
        self.fail(lost)
        return self._lost()

    def fail(self, error: BaseException) -> None:
        """Close the connection from any thread, failing everything on it."""
        with self._closing:
            if self.closed:
                return
            self.error = error
            self.closed = True
        self.reader.close()  # before the writer closes the socket
        self.writer.close()
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


def _close_all(fds: Optional[list]) -> None:
    for fd in fds or ():
        os.close(fd)
