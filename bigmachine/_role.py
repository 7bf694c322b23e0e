"""The reading role of a connection: who holds it, how it passes between reader
threads, blocking callers and event loops, and one read.

Whoever reads blocks in ``recv_into`` (or the TLS channel's ``read_into``),
busy-polling first while the connection's waits are short (``_sockio.Spin``),
straight into the buffer the decoder hands out, so bulk data lands in its
final place, and passes each decoded event to the connection on its own
thread; loop wake-ups that one read causes are sent together. The role is
*reading* (a reader thread has it), *busy* (its thread runs work the read
asked for), *parked* (nobody reads; a blocking caller may take it) or *on
loop*; while busy or parked the standby (``_standby``) watches the socket.
What reader threads and blocking callers do with it is ``_reader``'s;
here is the role itself, and an event loop holding it:

- The IO loop *follows* async work: a reader thread whose read handed
  requests to the loop (an ``async def`` or async generator to run) and
  left nothing to run itself gives the role to the loop, which reads
  without blocking when the socket is readable (``loop.add_reader``). The
  next request of an async method is then read and started on the thread
  that runs it: no hand-off from a reader thread to the loop per call. The
  loop hands the role back to a reader thread as soon as a read leaves it
  sync work to run (that thread runs it first) or a message arriving in
  pieces (bulk data, better read blocking). While the loop holds the role
  the standby looks at it every ``LOOP_STALL`` and gives the role back to
  a reader thread once the loop has read nothing for that long, whether
  nothing came (an idle connection then costs no wake-up at all) or a
  coroutine blocks the loop (which must not hold up sync calls and
  keepalives for longer). Not with TLS.
- A caller's event loop reads its own replies: a reader thread whose read
  woke one loop only, not the node's, gives it the role when every call in
  flight is an ``acall`` awaiting on that loop (not a stream's: a reader
  thread reading its next items meanwhile keeps the producer going); the
  replies then need no hand-off from a thread. It gives the role back when
  its calls are over (checked a turn after the read, so that the callers it
  woke can make more, and when a call ends unread), and any other caller
  takes it back at once (a blocking one, or one on another loop: that loop
  may stop, or block on the call, before the reply comes), as does the
  standby after ``LOOP_STALL``. Only one loop watches the socket at a time.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional

from ._sockio import Spin, recv_into
from ._standby import STANDBY
from ._threadstate import thread_state
from ._waiters import begin_batch, call_soon_threadsafe, end_batch
from ._decoder import Decoder
from ._wire import WireError
from ._writer import Writer
from .errors import MachineLost, ProtocolError

log = logging.getLogger("bigmachine.connection")

READING, BUSY, PARKED, ON_LOOP = "reading", "busy", "parked", "on loop"

# Seconds the IO loop, holding the role, may read nothing (nothing came, or a
# coroutine blocks it) before the role goes back to a reader thread.
LOOP_STALL = 0.1


class Role:
    """The reading role of one connection; Reader (``_reader``) adds what its
    threads and blocking callers do with it, and the threads (``_run``).

    on_event(event) handles one decoded frame event; is_closed() says the
    connection closed; calls_in_flight() whether any call of ours awaits a
    reply, calls_all_on(loop) whether an asyncio caller on loop awaits each;
    fail(error) and io_failed(what, exc) close the connection.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, tls: Any,
                 decoder: Decoder, peer: str, name: str, on_event: Callable[[tuple], None], is_closed: Callable[[], bool],
                 calls_in_flight: Callable[[], bool], calls_all_on: Callable[[Any], bool],
                 fail: Callable[[BaseException], None],
                 io_failed: Callable[[str, BaseException], BaseException], writer: Writer,
                 receive_into: Optional[Callable[..., int]] = None, spin: Optional[Spin] = None):
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.tls = tls
        self.decoder = decoder
        self.peer = peer
        self.name = name                  # of its threads
        self.on_event = on_event
        self.is_closed = is_closed
        self.calls_in_flight = calls_in_flight
        self.calls_all_on = calls_all_on
        self.fail = fail
        self.io_failed = io_failed
        self.writer = writer              # corked while a batch runs, and for TLS output
        self.receive_into = receive_into  # recv_into that takes descriptors too (shared memory)
        self.spin = spin                  # how long a blocking receive busy-polls (_sockio)
        self.last_recv = time.monotonic()
        self.bytes_received = 0
        self._deferred: list = []         # (fallback, fn, args) asked for by the current read
        self._lock = threading.Lock()
        self._state = READING
        self._generation = 0              # bumped whenever a reader thread is given the role
        self._idle = threading.Lock()     # an idle reader thread waits on it for the role
        self._idle.acquire()
        self._idle_waiting = False
        self._threads = 0                 # reader threads alive
        self._follow = False              # the current read gave work to the loop
        self._role_loop = loop            # the loop that holds the role (ON_LOOP)
        self._watching: Any = None        # the loop watching the socket (add_reader), if one is
        self._recalled = False            # a caller wants the role back from the loop reading now
        self._callers_read = True         # callers' loops may take the role (they can watch a socket)
        self._loop_reading = False        # the loop, holding the role, reads now
        self._loop_looked_at = False      # the standby will look at the loop holding the role

    def is_alive(self) -> bool:
        """True while a reader thread reads, runs deferred work, or waits for the role."""
        return self._threads > 0

    # ---- moving the role (with the lock held) ----------------------------------

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._run, args=(self._generation,), daemon=True,
                         name=self.name).start()

    def _to_thread(self) -> None:
        """A reader thread reads now: the idle one if there is one, else a new one."""
        self._state = READING
        self._role_loop = self.loop
        self._generation += 1
        if self._idle_waiting:
            self._idle_waiting = False
            self._idle.release()
        else:
            self._spawn()

    def _leave(self, state: str) -> None:
        """The role becomes busy or parked: nobody reads until it is taken again."""
        self._state = state
        STANDBY.arm(self.fd, self)

    def _take(self) -> None:
        self._state = READING
        STANDBY.disarm(self.fd, self)

    def data_waiting(self) -> None:
        """From the standby: bytes arrived while nobody read."""
        with self._lock:
            if self._state in (BUSY, PARKED) and not self.is_closed():
                self._to_thread()

    def close(self) -> None:
        """The connection closed: the idle reader thread ends, the standby forgets us."""
        with self._lock:
            STANDBY.forget(self.fd, self)
            if self._idle_waiting:
                self._idle_waiting = False
                self._idle.release()
        watching = self._watching
        if watching is not None:
            try:  # before the writer's release of the socket, also queued on the node's loop
                watching.call_soon_threadsafe(self._unwatch, watching)
            except RuntimeError:
                pass  # the loop is closed: it watches nothing

    def _buffered(self) -> bool:
        """Received bytes wait above the socket, where the standby cannot see them."""
        return self.tls is not None and self.tls.buffered()

    # ---- an event loop holding the role ------------------------------------------

    def follow(self) -> None:
        """From an event handler: this read gave the IO loop work (an async method)."""
        self._follow = True

    def _held_by_other(self, loop: Any) -> bool:
        """The role is with a caller's loop (not the node's) other than loop."""
        held = self._role_loop
        return self._state == ON_LOOP and held is not loop and held is not self.loop

    def call_dropped(self) -> None:
        """A call of ours ended unread (cancelled, timed out): if a caller's loop holds
        the role and no call is in flight any more, a reader thread reads (the loop
        gives the role back only after a read of its own, which may never come)."""
        if self._held_by_other(None) and not self.calls_in_flight():
            with self._lock:
                if self._held_by_other(None) and not self.calls_in_flight() and not self.is_closed():
                    self._recall()

    def _recall(self) -> None:
        """With the lock held: take the role from the caller's loop that holds it, for
        a reader thread; at the end of its read if it reads now."""
        if self._take_from_caller():
            self._to_thread()

    def _take_from_caller(self) -> bool:
        """With the lock held: take the role from the caller's loop that holds it,
        unless it reads just now (then it gives the role up when that read ends);
        True if taken (for whoever asked to read next)."""
        if not self._held_by_other(None):
            return False
        if self._loop_reading:
            self._recalled = True
            return False
        loop = self._role_loop
        self._role_loop = self.loop
        call_soon_threadsafe(loop, self._unwatch, loop)
        return True

    def _to_loop(self, generation: int, loop: Any) -> bool:
        """With the read's loop wake-ups still collecting: give the role to loop (the
        node's, or a caller's that awaits every call in flight) if this read left
        this thread no work; True if given."""
        if self._deferred or self.tls is not None or self.decoder.pending_bytes:
            return False
        with self._lock:
            if generation != self._generation or self.is_closed():
                return False
            watching = self._watching
            if watching is not None and watching is not loop:
                if not watching.is_closed():
                    return False  # another loop still watches the socket: not two at once
                self._watching = None  # a closed loop's selector watches nothing
            if loop is not self.loop and (not self._callers_read or not loop.is_running()
                                          or not self.calls_all_on(loop)):  # (a stopped loop cannot read)
                return False
            # Compiled, no Python code runs between the last look at the calls and the change
            # of state: a caller registering a call meanwhile (new_call, then
            # ensure_reading without the lock) sees either its call counted or
            # the role on the loop, which it then takes back.
            self._state = ON_LOOP
            self._role_loop = loop
            self._recalled = False
            self._generation += 1  # no reader thread holds it now
            look = not self._loop_looked_at  # else the standby looks already
            self._loop_looked_at = True
        call_soon_threadsafe(loop, self._watch, loop)  # after the wake-ups this read gave loop
        if look:
            STANDBY.wake_at(self, time.monotonic() + LOOP_STALL)
        return True

    def _look_at_loop(self, now: float) -> float:
        """With the lock held, for the standby: give the role back to a reader thread
        if the loop holds it and has read nothing for LOOP_STALL; when to look
        again, or 0 for never (the role is no longer the loop's)."""
        if self._state == ON_LOOP and not self.is_closed():
            if self._loop_reading or now - self.last_recv < LOOP_STALL:
                return now + LOOP_STALL
            loop = self._role_loop
            self._to_thread()
            call_soon_threadsafe(loop, self._unwatch, loop)
        self._loop_looked_at = False
        return 0.0

    def _watch(self, loop: Any) -> None:
        """On loop, given the role: read when the socket is readable."""
        with self._lock:
            if self._watching is not None or self._state != ON_LOOP or self._role_loop is not loop \
                    or self.is_closed():
                return
            self._watching = loop
        try:
            loop.add_reader(self.fd, self._loop_read, loop)
        except (NotImplementedError, RuntimeError):  # a loop that cannot watch a socket
            with self._lock:
                self._watching = None
                self._callers_read = False  # nor will the next: reader threads read
                if self._state == ON_LOOP and self._role_loop is loop and not self.is_closed():
                    self._to_thread()

    def _unwatch(self, loop: Any) -> None:
        """On loop: stop watching the socket, if it does."""
        if self._watching is loop:
            self._watching = None
            loop.remove_reader(self.fd)

    def _loop_read(self, loop: Any) -> None:
        """On loop, holding the role, the socket readable: read once without blocking,
        and keep the role unless the read left sync work or a message arriving in
        pieces, or (a caller's loop) its calls are over or another caller needs it."""
        with self._lock:
            if self._state != ON_LOOP or self._role_loop is not loop or self.is_closed():
                self._unwatch(loop)
                return
            self._loop_reading = True  # the standby does not take the role meanwhile
        # Within the read, the thread runs loop (its wake-ups run at once), and a
        # request read makes the connection's node current only meanwhile.
        state = thread_state()
        node, runs = state.node, state.loop
        state.loop = loop
        try:
            alive = self._read_once(socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            alive = True
        except BaseException as exc:
            state.node, state.loop = node, runs
            self._loop_reading = False
            self._unwatch(loop)
            if isinstance(exc, Exception):
                self._failed(exc)
                return
            # A KeyboardInterrupt (in Python code the read ran) stops the loop: a
            # reader thread reads on, as after a leader's (see leave_if_leading).
            with self._lock:
                self._recalled = False
                if self._state == ON_LOOP and self._role_loop is loop and not self.is_closed():
                    self._to_thread()
            raise
        finally:
            state.node, state.loop = node, runs
        with self._lock:
            self._loop_reading = False
            recalled, self._recalled = self._recalled, False
            if not alive or self.is_closed():
                self._unwatch(loop)
            elif self._deferred or self.decoder.pending_bytes or recalled:
                self._unwatch(loop)
                self._to_thread()  # which runs the deferred work first
            elif loop is not self.loop and not self.calls_in_flight():
                # Its calls are over, unless the callers this read woke make more
                # (in the loop's next turn, before this): else a reader thread reads.
                loop.call_soon(self._release, loop)

    def _release(self, loop: Any) -> None:
        """On a caller's loop that holds the role: give it back if no call is in flight."""
        with self._lock:
            if self._state == ON_LOOP and self._role_loop is loop and not self._loop_reading \
                    and not self.calls_in_flight() and not self.is_closed():
                self._unwatch(loop)
                self._to_thread()

    # ---- one read -----------------------------------------------------------------

    def _read_once(self, flags: int = 0, generation: int = -1) -> bool:
        """Receive once and handle what was decoded; False when reading is over.

        flags: recv flags (MSG_DONTWAIT on the loop); generation: a reader
        thread's, which may give the role to the loop (see _to_loop).
        """
        decoder, tls = self.decoder, self.tls
        if self.receive_into is not None:
            n = self.receive_into(self.sock, decoder.get_buffer(), decoder, flags, self.spin)
        elif tls is None:
            n = recv_into(self.sock, decoder.get_buffer(), flags, self.spin)
        else:
            n = tls.read_into(self.sock, decoder.get_buffer(), self.spin)
            if tls.outgoing.pending:
                self.writer.add_ciphertext(tls.pending_output())
        if n == 0:
            self.io_failed("read", EOFError("connection closed by peer"))
            return False
        self.last_recv = time.monotonic()
        self.bytes_received += n
        on_event = self.on_event
        pending = begin_batch()
        self._follow = False
        try:
            for event in decoder.buffer_updated(n):
                on_event(event)
            if generation >= 0:
                if self._follow:
                    self._to_loop(generation, self.loop)
                elif len(pending) == 1:  # this read woke one loop only
                    loop = next(iter(pending))
                    # A caller's: it may read its replies itself (asked again
                    # with the lock held; most reads stop here, without it).
                    if loop is not self.loop and self._callers_read and self.calls_all_on(loop):
                        self._to_loop(generation, loop)
        finally:
            end_batch(pending)
        return not self.is_closed()

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, WireError):
            log.warning("closing connection to %s: malformed frame: %s", self.peer, exc)
            err = ProtocolError(f"malformed frame from {self.peer}: {exc}")
            err.__cause__ = exc
            self.fail(err)
        elif isinstance(exc, (OSError, ssl.SSLError)):
            self.io_failed("read", exc)
        elif isinstance(exc, MachineLost):  # a write a handler made (a PONG, a CREDIT) failed
            self.fail(exc)
        else:
            # A reader must never die leaving a connection that looks open.
            log.exception("closing connection to %s: its reader failed", self.peer)
            self.io_failed("reader", exc)
