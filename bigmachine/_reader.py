"""The reading role of a connection: who turns bytes off the socket into frame events.

Whoever reads blocks in ``recv_into`` (or the TLS channel's ``read_into``),
busy-polling first while the connection's waits are short (``_sockio.Spin``),
straight into the buffer the decoder hands out, so bulk data lands in its
final place, and passes each decoded event to the connection on its own
thread; loop wake-ups that one read causes are sent together.

Who reads is chosen to save thread hand-offs, which are most of a small
call's cost (each a futex wake-up, often of an idle vCPU, and a GIL hand-over):

- A reader thread reads by default.
- Work a read asks for (a sync method to run) is *deferred*: the reader
  thread runs it itself once the read's events are handled, instead of
  handing it to a pool thread and back. Meanwhile the role is *busy*. For
  one piece of work the socket is armed with the standby (``_standby``): if
  anything arrives before it is done, another reader thread takes the role
  at once. A read that asks for several (a pipelining caller) runs them in
  turn with their small replies corked into one ``sendmsg``, and the
  standby's timer hands on reading, the pieces not yet begun (to the pool)
  and the corked replies once the batch has run for ``BOUND``. A blocking
  method therefore holds up other calls on its connection for a
  millisecond at most.
- A blocking caller *leads*: when the role is *parked* (nobody reads) it
  reads its own reply itself, handling whatever else arrives, and parks the
  role again, or hands it to a reader thread if other calls still wait. A
  reader thread parks the role after a read when a blocking caller wanted
  to lead and no call is in flight; the standby gives it back to a reader
  thread as soon as anything arrives that no caller reads.

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
  flight is an ``acall`` (or async stream) awaiting on that loop; the
  replies then need no hand-off from a thread. It gives the role back when
  its calls are over (checked a turn after the read, so that the callers it
  woke can make more), and any other caller takes it back at once (a
  blocking one, or one on another loop: that loop may stop, or block on the
  call, before the reply comes), as does the standby after ``LOOP_STALL``.
  Only one loop watches the socket at a time.

A reader thread that lost or parked the role waits, idle, to be given it
again; at most one waits per connection, the others end.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from ._profile import waiting
from ._sockio import Spin, recv_into
from ._standby import STANDBY
from ._threadstate import thread_state
from ._waiters import Waiter, begin_batch, call_soon_threadsafe, end_batch
from ._decoder import Decoder
from ._wire import WireError
from ._writer import Writer
from .errors import MachineLost, ProtocolError

log = logging.getLogger("bigmachine.connection")

READING, BUSY, PARKED, ON_LOOP = "reading", "busy", "parked", "on loop"

# Seconds a batch of deferred work may hold up reading (and the rest of the
# batch) before the standby hands both on.
BOUND = 0.001
# Seconds the IO loop, holding the role, may read nothing (nothing came, or a
# coroutine blocks it) before the role goes back to a reader thread.
LOOP_STALL = 0.1


class Reader:
    """The reading role of one connection, and its reader threads.

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
        self._batch: deque = deque()      # deferred work of a batch not yet begun
        self._deadline = 0.0              # when a running batch must hand on what is left
        self._lock = threading.Lock()
        self._state = READING
        self._generation = 0              # bumped whenever a reader thread is given the role
        self._lead_wanted = False         # a blocking caller found the role taken
        self._leader: Any = None          # the Waiter of the blocking call reading, if one is
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

    def start(self) -> None:
        with self._lock:
            self._spawn()

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

    def ensure_reading(self, loop: Any = None) -> None:
        """For a caller that will not lead (loop: the one it awaits on, None for a
        thread): make a reader thread read if the role is parked, or held by a
        caller's loop other than loop (which may stop before this call ends)."""
        if self._state == PARKED or self._held_by_other(loop):
            with self._lock:
                if self._state == PARKED:
                    STANDBY.disarm(self.fd, self)
                    self._to_thread()
                elif self._held_by_other(loop):
                    self._recall()

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
        if self._loop_reading:
            self._recalled = True
            return
        loop = self._role_loop
        self._to_thread()
        call_soon_threadsafe(loop, self._unwatch, loop)

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

    # ---- deferred work ------------------------------------------------------

    def defer(self, fallback: Callable, fn: Callable, *args: Any) -> None:
        """From an event handler: run fn(*args) on this thread once the read's
        events are handled, unless reading must go on first: then
        fallback(complete, fn, *args). fn may return a callable that must not
        block, to run once this thread reads again (the sending of a reply)."""
        self._deferred.append((fallback, fn, args))

    def _run_deferred(self, generation: int) -> bool:
        """Run this read's deferred work; False if another thread took the role meanwhile."""
        work, self._deferred = self._deferred, []
        if self.tls is not None and self._buffered():
            _pass_on(work)
            return True
        if len(work) > 1:
            return self._run_batch(generation, work)
        fallback, fn, args = work.pop()
        del fallback
        fd = self.fd
        with self._lock:  # _leave(BUSY), inline: this is every small call's path
            self._state = BUSY
            STANDBY.arm(fd, self)
        after = None
        try:
            after = fn(*args)
        except Exception:
            log.exception("connection to %s: deferred work failed", self.peer)
        fn = args = None  # hold nothing of a finished call
        with self._lock:
            taken = generation == self._generation
            if taken:  # _take(), inline
                self._state = READING
                STANDBY.disarm(fd, self)
        if after is not None:
            after()
        return taken

    def _run_batch(self, generation: int, work: list) -> bool:
        """Run a read's deferred pieces in turn, their small replies corked together.

        Bytes arriving meanwhile wait (a pipelining caller sends more while
        its first requests run); instead the standby hands on reading, and
        the pieces not yet begun to the pool, if the batch runs past BOUND.
        """
        batch = self._batch
        with self._lock:
            batch.extend(work)
            self._state = BUSY
            self._deadline = deadline = time.monotonic() + BOUND
        del work
        STANDBY.wake_at(self, deadline)
        corked = self.writer.cork()
        try:
            while True:
                with self._lock:
                    if not batch:
                        break
                    fallback, fn, args = batch.popleft()
                try:
                    after = fn(*args)
                    if after is not None:
                        after()
                except Exception:
                    log.exception("connection to %s: deferred work failed", self.peer)
                fn = args = after = None  # hold nothing of a finished call
        finally:
            if corked:
                self.writer.uncork()
        with self._lock:
            self._deadline = 0.0
            if generation != self._generation:
                return False
            self._state = READING
        return True

    def timed_out(self, now: float) -> float:
        """From the standby: hand on a batch that ran past its deadline, and look
        at the loop holding the role (see _look_at_loop); when to look again, or
        0 for never."""
        left = None
        with self._lock:
            deadline = self._deadline
            if deadline and now >= deadline:
                self._deadline = deadline = 0.0
                left = list(self._batch)
                self._batch.clear()
                if self._state == BUSY and not self.is_closed():
                    self._to_thread()
            look = self._look_at_loop(now) if self._loop_looked_at else 0.0
        if left is not None:
            self.writer.uncork(anyone=True)  # the replies of the pieces already run
            _pass_on(left)
        return min((t for t in (deadline, look) if t), default=0.0)

    # ---- the IO loop following async work ----------------------------------------

    def follow(self) -> None:
        """From an event handler: this read gave the IO loop work (an async method)."""
        self._follow = True

    def _to_loop(self, generation: int, loop: Any) -> bool:
        """With the read's loop wake-ups still collecting: give the role to loop (the
        node's, or a caller's that awaits every call in flight) if this read left
        this thread no work; True if given."""
        if self._deferred or self.tls is not None or self.decoder.pending_bytes:
            return False
        with self._lock:
            if generation != self._generation or self.is_closed():
                return False
            if loop is not self.loop and (not self._callers_read or not self.calls_all_on(loop)
                                          or not loop.is_running()):  # a stopped loop cannot read
                return False
            watching = self._watching
            if watching is not None and watching is not loop:
                if not watching.is_closed():
                    return False  # another loop still watches the socket: not two at once
                self._watching = None  # a closed loop's selector watches nothing
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

    # ---- leading ----------------------------------------------------------------

    def try_lead(self, waiter: Waiter) -> bool:
        """For the blocking call whose replies go to waiter: take the role if it is parked.

        If it returns True the caller reads with read_until, and leave_if_leading()
        gives the role up; the reader keeps who leads, so that an exception the
        caller meets anywhere (a KeyboardInterrupt) cannot strand the role.
        """
        with self._lock:
            if self._state != PARKED:
                # A caller's loop holds it for its own calls: it may stop, or
                # be this very thread's, before this call ends.
                if self._held_by_other(None) and not self._loop_reading:
                    loop = self._role_loop
                    self._role_loop = self.loop
                    call_soon_threadsafe(loop, self._unwatch, loop)
                else:
                    if self._held_by_other(None):
                        self._recalled = True
                    self._lead_wanted = True
                    return False
            self._state = READING  # _take(), inline: every blocking call's path
            STANDBY.disarm(self.fd, self)
            self._leader = waiter
            return True

    def leads(self, waiter: Waiter) -> bool:
        """True if the call of waiter took the role with try_lead and still holds it."""
        return self._leader is waiter

    def read_until(self, waiter: Waiter) -> None:
        """For the leader: read and handle events until waiter has an item."""
        state = thread_state()  # a request read here makes its node current (_dispatch)
        node = state.node
        try:
            while not waiter.items and self._read_once():
                if self._deferred:  # a caller does not run methods: the pool does
                    _pass_on(self._deferred)
                    self._deferred = []
        except Exception as exc:
            self._failed(exc)
        finally:
            state.node = node

    def leave_if_leading(self, waiter: Optional[Waiter]) -> None:
        """The call of waiter is over: if it leads, park the role, or give it to a
        reader thread if others wait."""
        if waiter is None or self._leader is not waiter:
            return
        self._leader = None
        if self._deferred:
            _pass_on(self._deferred)
            self._deferred = []
        with self._lock:
            if self.calls_in_flight() or self._buffered() or self.is_closed():
                self._to_thread()
            else:  # _leave(PARKED), inline: every blocking call's path
                self._state = PARKED
                STANDBY.arm(self.fd, self)

    # ---- reader threads ---------------------------------------------------------

    def _run(self, generation: int) -> None:
        try:
            while True:
                if self._read_loop(generation):
                    return
                with self._lock:  # lost or parked the role: wait to be given it again
                    if self._idle_waiting or self.is_closed():
                        return
                    self._idle_waiting = True
                with waiting():
                    self._idle.acquire()
                if self.is_closed():
                    return
                generation = self._generation
        except BaseException as exc:
            self._failed(exc)
        finally:
            with self._lock:
                self._threads -= 1

    def _read_loop(self, generation: int) -> bool:
        """Read while this thread holds the role; True once reading is over for good."""
        if self._deferred and not self._run_deferred(generation):  # left by the loop
            return False
        while self._read_once(0, generation):
            if generation != self._generation:  # given to the loop
                return False
            if self._deferred and not self._run_deferred(generation):
                return False
            if self._lead_wanted and not self.calls_in_flight() and not self._buffered():
                with self._lock:
                    self._lead_wanted = False
                    if generation == self._generation:
                        self._leave(PARKED)
                return False
        return True

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


def _pass_on(work: Any) -> None:
    """Give deferred work to its fallbacks."""
    for fallback, fn, args in work:
        fallback(complete, fn, *args)


def complete(fn: Callable, *args: Any) -> None:
    """Run deferred work somewhere else than on its reader, with what it left to do."""
    after = fn(*args)
    if after is not None:
        after()
