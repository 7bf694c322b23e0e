"""What a connection's reader threads and blocking callers do with its reading role (``_role``).

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
- An event loop may hold the role too: the node's, following async work,
  or a caller's, reading its own replies (``_role``); any caller that the
  loop may not serve takes it back.

A reader thread that lost or parked the role waits, idle, to be given it
again; at most one waits per connection, the others end.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Optional

from ._profile import waiting
from ._role import BUSY, PARKED, READING, Role
from ._standby import STANDBY
from ._threadstate import thread_state
from ._waiters import Waiter

log = logging.getLogger("bigmachine.connection")

# Seconds a batch of deferred work may hold up reading (and the rest of the
# batch) before the standby hands both on.
BOUND = 0.001


class Reader(Role):
    """The reading role of one connection, and its reader threads (see Role for
    what the connection gives it)."""

    def __init__(self, *args: Any, **kwargs: Any):
        Role.__init__(self, *args, **kwargs)
        self._batch: deque = deque()      # deferred work of a batch not yet begun
        self._deadline = 0.0              # when a running batch must hand on what is left
        self._lead_wanted = False         # a blocking caller found the role taken
        self._leader: Any = None          # the Waiter of the blocking call reading, if one is

    def start(self) -> None:
        with self._lock:
            self._spawn()

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

    # ---- leading ----------------------------------------------------------------

    def try_lead(self, waiter: Waiter) -> bool:
        """For the blocking call whose replies go to waiter: take the role if it is parked.

        If it returns True the caller reads with read_until, and leave_if_leading()
        gives the role up; the reader keeps who leads, so that an exception the
        caller meets anywhere (a KeyboardInterrupt) cannot strand the role.
        """
        with self._lock:
            # A caller's loop may hold it for its own calls: it may stop, or be
            # this very thread's, before this call ends.
            if self._state != PARKED and not self._take_from_caller():
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


def _pass_on(work: Any) -> None:
    """Give deferred work to its fallbacks."""
    for fallback, fn, args in work:
        fallback(complete, fn, *args)


def complete(fn: Callable, *args: Any) -> None:
    """Run deferred work somewhere else than on its reader, with what it left to do."""
    after = fn(*args)
    if after is not None:
        after()
