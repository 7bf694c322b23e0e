"""Sealed shared-memory segments: how large arrays cross a Unix socket without a copy.

A sender copies a buffer once into a new memfd and seals it (no shrink, no
grow, no write): from then on nobody, the sender included, can change or
truncate it, so a receiver that maps it can never fault on a vanished page
nor see bytes change under it. The descriptor travels with SCM_RIGHTS. The
receiver maps it privately (copy-on-write): it gets an ordinary writable
array, and its own writes stay its own. While its mapping has no written
(dirty) page, the receiver can pass the same sealed descriptor on, with no
copy, and the next receiver sees exactly the bytes the sender saw.

Sans-IO: this module makes, checks, maps and inspects segments; the
connection moves their descriptors.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import weakref
from typing import Optional

from .errors import ProtocolError

AVAILABLE = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
SEALS = ((fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
         if AVAILABLE else 0)
REQUIRED_SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE) if AVAILABLE else 0
PAGE = mmap.PAGESIZE


def create(data: memoryview) -> int:
    """A new sealed memfd holding a copy of data; the caller owns (and closes) it."""
    fd = os.memfd_create("bigmachine-array", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        size = view.nbytes
        os.ftruncate(fd, size)
        written = 0
        while written < size:
            written += os.pwrite(fd, view[written:written + (1 << 30)], written)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(fd: int, size: int) -> None:
    """Refuse a descriptor that is not a sealed memfd of exactly size bytes: a peer
    must not be able to shrink a segment under our mapping."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolError(f"a shared-memory segment is not a sealable memfd: {exc}") from exc
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ProtocolError("a shared-memory segment arrived unsealed (it could shrink or change)")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise ProtocolError(f"a shared-memory segment holds {actual} bytes, not the {size} "
                            "its message says")


class _Mapped:
    __slots__ = ("fd", "start", "size", "map")

    def __init__(self, fd: int, start: int, size: int, mapping: "weakref.ref"):
        self.fd = fd
        self.start = start
        self.size = size
        self.map = mapping


_mapped: dict[int, _Mapped] = {}   # received segments still mapped, by start address
_lock = threading.Lock()


def map_segment(fd: int, size: int) -> memoryview:
    """Map a checked segment privately (copy-on-write) as a writable buffer.

    The segment keeps fd while its mapping lives (so that it can be passed on
    unwritten, see find) and closes it when the last view of the buffer is gone.
    """
    if not size:
        os.close(fd)
        return memoryview(bytearray())
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mapping)
    start = _address(view)
    with _lock:
        _mapped[start] = _Mapped(fd, start, size, weakref.ref(mapping))
    weakref.finalize(mapping, _unmapped, start, fd)
    return view


def _unmapped(start: int, fd: int) -> None:
    with _lock:
        entry = _mapped.get(start)
        if entry is not None and entry.fd == fd:
            del _mapped[start]
    os.close(fd)


def find(view: memoryview) -> Optional[tuple[int, int]]:
    """(fd, offset) of the received segment that holds view, when that segment was
    never written here: it can then travel on as it is. None otherwise."""
    if not _mapped or view.nbytes == 0:
        return None
    try:
        start = _address(view)
    except TypeError:  # a read-only buffer: not one of our (writable) mappings
        return None
    with _lock:
        for entry in _mapped.values():
            if entry.start <= start and start + view.nbytes <= entry.start + entry.size:
                break
        else:
            return None
    if _private_dirty(entry.start, entry.size):
        return None  # written here: what the next receiver would see is not the segment
    return entry.fd, start - entry.start


def _address(view: memoryview) -> int:
    """Where a writable buffer's bytes start in this process's memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view.cast("B") if view.ndim != 1 or
                                                      view.format != "B" else view))


def _private_dirty(start: int, size: int) -> bool:
    """Whether the mapping at start has anonymous (written, copied) pages: /proc/self/smaps.

    A private file mapping's pages become anonymous when written (copy-on-write);
    reads leave them the segment's own shared pages.
    """
    end = start + ((size + PAGE - 1) // PAGE) * PAGE
    with open("/proc/self/smaps", "rb") as f:
        inside = False
        for line in f:
            if line[:1] in _HEX and b"-" in line[:40]:
                lo, _, hi = line.split(b" ", 1)[0].partition(b"-")
                try:
                    a, b = int(lo, 16), int(hi, 16)
                except ValueError:
                    continue
                inside = a < end and b > start
            elif inside and line.startswith(b"Anonymous:") and int(line.split()[1]) > 0:
                return True
    return False


_HEX = b"0123456789abcdef"
