"""A sender's pool of reusable, pre-faulted shared-memory segments.

Filling fresh shared pages costs more than the copy itself (each page is
allocated, zeroed and faulted in), so a sender keeps a few segments mapped
and writes each large buffer into one nobody else maps any more.

A segment is a memfd sealed against shrinking and growing (a receiver's
mapping can never lose a page: no SIGBUS) but not against writing, since
its owner rewrites it. What makes rewriting safe is who holds it: every
descriptor lent for a send is a new open file description of the segment
(``/proc/self/fd``) carrying an open-file-description read lock. The kernel
keeps that lock while the description lives: in flight in a socket, in the
receiver's descriptor and mapping, and in every machine the receiver
forwards the same descriptor to. It goes when the last of them is closed or
unmapped, or when the process holding it dies. The owner rewrites a
segment only when no such lock is left, so a receiver's array never
changes under it (its copy-on-write mapping would otherwise show the
owner's rewrite on the pages it has not written).

The pool is bounded (``BUDGET`` bytes, and no segment above half of it:
larger buffers go as fresh segments): to make room it drops the segments
used longest ago, held or not; a dropped segment held elsewhere lives on
until its last holder lets go. Segments idle for ``IDLE`` seconds are
dropped too, so a process that stopped sending gives its memory back.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from typing import Optional

import numpy as np

from ._buffers import prefault

PAGE = mmap.PAGESIZE
AVAILABLE = (hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
             and hasattr(fcntl, "F_OFD_SETLK"))
SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) if AVAILABLE else 0
BUDGET = min(1 << 30, os.sysconf("SC_PHYS_PAGES") * PAGE // 8)
IDLE = 10.0
# A segment serves buffers down to SLACK / (SLACK + 1) of its size (its tail then zeroed).
SLACK = 4
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid


class _Segment:
    """One memfd of the pool, mapped shared and writable here."""

    __slots__ = ("fd", "size", "mapping", "array", "used_at", "filled", "busy")

    def __init__(self, size: int):
        self.fd = os.memfd_create("bigmachine-array", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.mapping: Optional[mmap.mmap] = None
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            os.posix_fallocate(self.fd, 0, size)  # out of memory: an error now, not SIGBUS later
            self.mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            self.close()
            raise
        # Page tables now, not a fault per page; if the kernel will not, the first
        # copy faults them in (the pages themselves are allocated already).
        prefault(self.mapping)
        self.size = size
        self.array = np.frombuffer(self.mapping, dtype=np.uint8)
        self.used_at = time.monotonic()
        self.filled = 0      # bytes the last send wrote
        self.busy = False    # being filled by a thread of ours

    def held(self) -> bool:
        """Whether a lent description of it is still alive anywhere."""
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        return _FLOCK.unpack(fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK

    def fill(self, data: memoryview) -> None:
        n = data.nbytes
        np.copyto(self.array[:n], np.frombuffer(data, dtype=np.uint8))
        if self.filled > n:
            self.array[n:self.filled] = 0  # no receiver sees an earlier send's bytes
        self.filled = n

    def lend(self) -> int:
        """A new read-only description of the segment, read-locked: the caller's to send."""
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        self.array = None
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Arena:
    """The pool: lend(data) copies data into a segment no one holds and lends it."""

    def __init__(self, budget: int = BUDGET, idle: float = IDLE):
        self.budget = budget
        self.idle = idle
        self.segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None

    def lend(self, data: memoryview) -> Optional[tuple[int, int]]:
        """(fd, size): a locked description of a segment of size bytes whose first
        data.nbytes bytes are data's (the rest zero). None when data does not fit
        half the budget or the pool cannot get the memory or descriptors (the caller
        sends it another way). Raises nothing else than what copying raises."""
        n = data.nbytes
        try:
            segment = self._take(n)
        except OSError:
            return None
        if segment is None:
            return None
        try:
            segment.fill(data)
            fd = segment.lend()
        except OSError:
            fd = -1
        finally:
            with self._lock:
                segment.busy = False
                segment.used_at = time.monotonic()
        return (fd, segment.size) if fd >= 0 else None

    def held_bytes(self) -> int:
        """Bytes the pool keeps in its segments (for a look from outside: tests)."""
        with self._lock:
            return sum(s.size for s in self.segments)

    def _take(self, n: int) -> Optional[_Segment]:
        """A segment of at least n bytes that nobody holds, marked busy: a free one
        that fits, else a new one (after dropping what the budget needs)."""
        size = -(-n // PAGE) * PAGE
        # Room for two of any size served: one a receiver still holds, one to fill.
        if not AVAILABLE or not n or size > self.budget // 2:
            return None
        with self._lock:
            fits = [s for s in self.segments
                    if not s.busy and size <= s.size <= size + size // SLACK and not s.held()]
            if fits:
                segment = min(fits, key=lambda s: s.size)
            elif self._make_room(size):
                segment = _Segment(size)
                self.segments.append(segment)
                self._arm()
            else:
                return None  # the budget is all in segments being filled
            segment.busy = True
            return segment

    def _make_room(self, size: int) -> bool:
        """Drop the segments used longest ago until size more bytes fit the budget;
        False if they cannot (the rest are being filled)."""
        total = sum(s.size for s in self.segments)
        for segment in sorted(self.segments, key=lambda s: s.used_at):
            if total + size <= self.budget:
                break
            if not segment.busy:
                self._drop(segment)
                total -= segment.size
        return total + size <= self.budget

    def _drop(self, segment: _Segment) -> None:
        self.segments.remove(segment)
        segment.close()  # a holder's description keeps the memory until it lets go

    def trim(self, idle: float) -> None:
        """Drop the segments unused for idle seconds (0: every one not being filled)."""
        with self._lock:
            now = time.monotonic()
            for segment in [s for s in self.segments if not s.busy and now - s.used_at >= idle]:
                self._drop(segment)

    def _arm(self) -> None:
        """Trim idle segments every IDLE seconds while there are any."""
        if self._timer is None and self.segments:
            self._timer = threading.Timer(self.idle, self._tick)
            self._timer.daemon = True
            self._timer.start()

    def _tick(self) -> None:
        self.trim(self.idle)
        with self._lock:
            self._timer = None
            self._arm()

    def forget(self) -> None:
        """In a forked child: the parent's segments are the parent's to fill."""
        self._lock = threading.Lock()
        self._timer = None
        for segment in self.segments:
            try:
                segment.close()
            except BufferError:
                pass  # a parent's thread was filling it: the child keeps that mapping
        self.segments = []


ARENA = Arena()
if AVAILABLE:
    os.register_at_fork(after_in_child=ARENA.forget)
