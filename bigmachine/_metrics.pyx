# cython: language_level=3, annotation_typing=False
"""Per-method call counters: count, errors, in flight, recent latencies.

Each node counts the calls it serves (where the work runs) and each Machine
handle the calls made through it (on the caller, transport included). The
counting path is two short critical sections and two clock reads per call,
well under a microsecond (``python -m bigmachine bench counting``);
percentiles are computed only when someone asks for them.

``BIGMACHINE_COUNTERS=0`` in the environment turns counting off in every
process that inherits it (used to measure what counting costs). Compiled:
both ends count every call, and as Python the counting was 4% of a small
call's instructions.
"""

import os
import threading
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from libc.stdint cimport int64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

ENABLED = os.environ.get("BIGMACHINE_COUNTERS", "1") != "0"


cdef inline int64_t _now_ns() noexcept:
    """time.perf_counter_ns() (CLOCK_MONOTONIC on Linux) without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec


RECENT = 1024       # latencies kept per method for p50/p99
MAX_METHODS = 1000  # distinct names counted per table; more are counted as OTHER
OTHER = "(other)"


cdef class MethodCounter:
    """The counts of one method. begin() when a call starts, end() when it ends."""

    cdef readonly Py_ssize_t count
    cdef readonly Py_ssize_t errors
    cdef readonly Py_ssize_t in_flight
    cdef readonly object recent

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.in_flight = 0
        self.recent = deque(maxlen=RECENT)  # nanoseconds

    cpdef object begin(self):
        """Count a call that starts now; returns its start time for end()."""
        self.count += 1
        self.in_flight += 1
        return _now_ns()

    cpdef end(self, object started, bint failed):
        """Count the end of a call begun at started; failed: it ended without a reply."""
        self.recent.append(_now_ns() - <int64_t>started)
        self.in_flight -= 1
        if failed:
            self.errors += 1

    def snapshot(self) -> dict:
        """count, errors, in_flight, and p50/p99 (seconds, None before any call ended)."""
        recent = sorted(list(self.recent))
        return {"count": self.count, "errors": self.errors, "in_flight": self.in_flight,
                "p50": percentile(recent, 50), "p99": percentile(recent, 99)}


def percentile(ordered: list, q: float) -> Optional[float]:
    """The q-th percentile (nearest rank) of sorted nanoseconds, in seconds."""
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, -(-len(ordered) * q // 100) - 1))
    return ordered[int(rank)] / 1e9


cdef class Counters:
    """A table of MethodCounters by method name."""

    cdef readonly dict methods
    cdef object _lock

    def __init__(self) -> None:
        self.methods = {}
        self._lock = threading.Lock()

    def __call__(self, method: str) -> Optional[MethodCounter]:
        """The counter of method (made on first use), or None when counting is off."""
        counter = self.methods.get(method)
        if counter is None and ENABLED and type(method) is str:  # else the call is refused
            with self._lock:
                if len(self.methods) >= MAX_METHODS and method not in self.methods:
                    method = OTHER
                counter = self.methods.setdefault(method, MethodCounter())
        return counter

    def snapshot(self) -> dict[str, dict]:
        """{method: MethodCounter.snapshot()} of every method counted so far."""
        return {name: counter.snapshot() for name, counter in list(self.methods.items())}


def counted(MethodCounter counter, fn: Callable, *args: Any) -> Any:
    """fn(*args), counted by counter (None: not counted)."""
    if counter is None:
        return fn(*args)
    started = counter.begin()
    try:
        result = fn(*args)
    except BaseException:
        counter.end(started, True)
        raise
    counter.end(started, False)
    return result


def counted_iter(counter: Optional[MethodCounter], items: Iterator) -> Iterator:
    """Iterate over items, counted as one call from the first item to the end.

    Stopping early is not an error; an exception from items is.
    """
    if counter is None:
        yield from items
        return
    started = counter.begin()
    failed = False
    try:
        yield from items
    except GeneratorExit:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        counter.end(started, failed)


async def acounted_iter(counter: Optional[MethodCounter], items: AsyncIterator) -> AsyncIterator:
    """The asyncio form of counted_iter."""
    started = counter.begin() if counter is not None else 0
    failed = False
    try:
        async for item in items:
            yield item
    except GeneratorExit:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        if counter is not None:
            counter.end(started, failed)
