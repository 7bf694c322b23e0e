# cython: language_level=3, annotation_typing=False
"""Cross-thread wake-ups: a call's reply waiter, the in-flight gate, batched loop wake-ups.

A connection's reader runs on a thread of its own; callers wait on threads
or on event loops. Everything here wakes one side from the other as cheaply
as it can: a plain lock release for a thread, and for a loop one
``call_soon_threadsafe`` per read rather than one per message. Compiled:
every small call makes a Waiter and passes the Gate twice, and a compiled
class with typed fields costs a fraction of a Python one (declared in _waiters.pxd).
"""
import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from cpython.pythread cimport PyThread_get_thread_ident
from cpython.set cimport PySet_Add, PySet_Discard

from bigmachine._profile import WAITING
from bigmachine._threadstate cimport ThreadState, thread_state

cdef set _waiting = WAITING


def mark_loop_thread(loop: asyncio.AbstractEventLoop) -> None:
    """Record that loop runs on the calling thread (so nothing there blocks on it)."""
    thread_state().loop = loop


def on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    """True if the calling thread runs loop."""
    return thread_state().loop is loop


def begin_batch() -> dict:
    """Start collecting loop wake-ups on this thread; pass the result to end_batch."""
    pending = thread_state().pending = {}
    return pending


def end_batch(pending: dict) -> None:
    """Wake each loop once with every callback collected for it since begin_batch."""
    cdef ThreadState state = thread_state()
    state.pending = None
    for loop, items in pending.items():
        if state.loop is loop:  # the loop itself read: run them now, within the read's callback
            _run_batch(loop, items)
        else:
            call_soon_threadsafe(loop, _run_batch, loop, items)


def call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable, *args: Any) -> None:
    """loop.call_soon_threadsafe, batched per loop between begin_batch and end_batch.

    One wake-up of a loop then carries every reply and request of a read for
    it, instead of one wake-up (a write to its self-pipe) each.
    """
    pending = thread_state().pending
    if pending is None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: whoever waited on it is gone
    else:
        pending.setdefault(loop, []).append((callback, args))


def _run_batch(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Run a batch's callbacks on loop; one that raises is reported as the loop
    reports a callback's error, and the rest still run."""
    for callback, args in items:
        try:
            callback(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            loop.call_exception_handler({"message": f"exception in callback {callback!r}",
                                         "exception": exc})


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def wake_threadsafe(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> bool:
    """Wake fut on its loop, unless it is done or its loop is gone; True if woken."""
    if fut.done():
        return False
    try:
        loop.call_soon_threadsafe(_wake, fut)
    except RuntimeError:
        return False  # the loop is closed: its caller gave up
    return True


cdef class Waiter:
    """Delivers a call's replies from the connection's reader to its caller.

    The reader calls ``put``; a thread caller blocks in ``get`` on a plain
    lock (the cheapest cross-thread wake-up), made only if it must wait (a
    caller that read its own reply never does); an asyncio caller awaits
    ``aget`` on its own loop.
    """

    def __cinit__(self, bint stream=False):
        self.items = deque()
        self.stream = stream

    def put(self, item: Any) -> None:
        self.items.append(item)
        fut = self.future
        if fut is not None:
            self.future = None
            call_soon_threadsafe(self.loop, _wake, fut)
            return
        lock = self.lock
        if lock is not None and lock.locked():
            try:
                lock.release()
            except RuntimeError:
                pass

    def get(self, timeout: Optional[float]) -> Any:
        if self.items:
            return self.items.popleft()
        lock = threading.Lock()
        lock.acquire()
        self.lock = lock  # put() releases it from now on; check again for one that came before
        deadline = None if timeout is None else time.monotonic() + timeout
        cdef object me = PyThread_get_thread_ident()
        PySet_Add(_waiting, me)  # the profiler sees no frame of this wait
        try:
            while not self.items:
                wait = -1 if deadline is None else max(deadline - time.monotonic(), 0)
                if not lock.acquire(timeout=wait) and not self.items:
                    raise TimeoutError
        finally:
            PySet_Discard(_waiting, me)
        return self.items.popleft()

    def arrival(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> Optional[asyncio.Future]:
        """None if an item is there to take; else a future of the running loop
        that put() wakes (await it, then ask again). For callers that must not
        add a coroutine level (each costs every resumption that passes it).
        loop: the running loop, if the caller has it at hand."""
        if self.items:
            return None
        if loop is None:
            loop = asyncio.get_running_loop()
        self.loop = loop
        fut = self.future = loop.create_future()
        if self.items:  # put() ran before the future was visible
            self.future = None
            return None
        return fut

    cpdef bint awaits_on(self, loop):
        """True if an asyncio caller on loop awaits this call's reply (not a
        stream's items: a reader thread reading them meanwhile keeps the
        producer going while the caller's loop is busy with the last ones)."""
        return self.loop is loop and self.lock is None and not self.stream

    async def aget(self) -> Any:
        fut = self.arrival()
        while fut is not None:
            await fut
            fut = self.arrival()
        return self.items.popleft()


cdef class Gate:
    """Counts calls in flight; callers beyond the limit wait their turn.

    Taking and giving back a place with room to spare takes no lock: with
    the GIL held, a test and change of a C field that calls no Python code
    in between cannot be interleaved. The lock is taken only to wait, and by
    a release that has waiters to wake; a waiter counts itself (waiting, or
    in async_waiters) before it can let the GIL go, so no release misses it.
    """

    def __init__(self, Py_ssize_t limit):
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiting = 0
        self.async_waiters = deque()

    def acquire(self, timeout: Optional[float]) -> None:
        if self.try_acquire():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.used >= self.limit:
                self.waiting += 1
                try:
                    if deadline is None:
                        self.cond.wait()
                    else:
                        wait = deadline - time.monotonic()
                        if wait <= 0:
                            raise TimeoutError("too many calls in flight")
                        self.cond.wait(wait)
                finally:
                    self.waiting -= 1
            self.used += 1

    cpdef bint try_acquire(self):
        """Take a place without waiting, if there is one."""
        if self.used < self.limit:
            self.used += 1
            return True
        return False

    async def aacquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiter = (loop, loop.create_future())
            with self.cond:
                if self.used < self.limit:
                    self.used += 1
                    return
                self.async_waiters.append(waiter)
            try:
                await waiter[1]
            except asyncio.CancelledError:
                with self.cond:
                    if waiter in self.async_waiters:
                        self.async_waiters.remove(waiter)
                    elif self.used < self.limit:
                        self._wake_next()  # we were handed the turn: pass it on
                raise

    def release(self) -> None:
        self.used -= 1
        if self.waiting or self.async_waiters:
            with self.lock:
                if self.waiting:
                    self.cond.notify()
                if self.async_waiters:
                    self._wake_next()

    cdef _wake_next(self):
        """With cond held: wake the first async waiter whose loop still runs."""
        while self.async_waiters:
            loop, fut = self.async_waiters.popleft()
            if wake_threadsafe(loop, fut):
                break
