"""Sealed shared-memory segments: how large arrays cross a Unix socket without a copy.

A segment is a memfd sealed at least against shrinking and growing, so a
receiver that maps it can never fault on a vanished page. It is either a
fresh copy sealed against writing too (``create``), or a segment of the
sender's pool (``_arena``) that the sender rewrites only once nobody holds
it. Either way its bytes never change while a receiver maps it. The
descriptor travels with SCM_RIGHTS. The receiver maps it privately
(copy-on-write): it gets an ordinary writable array, and its own writes
stay its own. While its mapping has no written (dirty) page, the receiver
can pass the same descriptor on, with no copy, and the next receiver sees
exactly the bytes the sender saw.

Sans-IO: this module makes, checks, maps and inspects segments; the
connection moves their descriptors.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import threading
import weakref
from typing import Optional

import numpy as np

from ._buffers import SharedMapping, address_of
from .errors import ProtocolError

AVAILABLE = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
SEALS = ((fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
         if AVAILABLE else 0)
# What a receiver needs for its own safety: a pool segment is not sealed against writing.
REQUIRED_SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) if AVAILABLE else 0
PAGE = mmap.PAGESIZE


def create(data: memoryview) -> int:
    """A new sealed memfd holding a copy of data; the caller owns (and closes) it."""
    fd = os.memfd_create("bigmachine-array", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = as_bytes(data)
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


def as_bytes(data: memoryview) -> memoryview:
    """data (C-contiguous) as a flat view of unsigned bytes."""
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


def check(fd: int, size: int) -> None:
    """Refuse a descriptor that is not a sealed memfd of exactly size bytes: a peer
    must not be able to shrink a segment under our mapping. (One not sealed
    against writing is accepted: a pool's segment. A peer that wrote it while
    we map it would change only what it sent us; it cannot make us fault.)"""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolError(f"a shared-memory segment is not a sealable memfd: {exc}") from exc
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ProtocolError("a shared-memory segment arrived unsealed (it could shrink or grow)")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise ProtocolError(f"a shared-memory segment holds {actual} bytes, not the {size} "
                            "its message says")


# The received segments still mapped, by start address: an entry goes with its mapping.
_mapped: "weakref.WeakValueDictionary[int, SharedMapping]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def map_segment(fd: int, size: int) -> memoryview:
    """Map a checked segment privately (copy-on-write) as a writable buffer.

    Its pages are mapped as they are first touched: already in memory (the
    sender's), they cost a minor fault each, and nothing at all when the
    buffer is only passed on.

    The mapping owns fd while it lives (so that it can be passed on unwritten,
    see find) and closes it when the last view of the buffer is gone. On
    failure (OSError: ENOMEM) fd is still the caller's.
    """
    if not size:
        os.close(fd)
        return memoryview(bytearray())
    mapping = SharedMapping(fd, size)
    with _lock:
        _mapped[mapping.address] = mapping
    return memoryview(mapping)


def find(view: memoryview) -> Optional[tuple[int, int, int]]:
    """(fd, size, offset) of the received segment of size bytes that holds view
    at offset, when that segment was never written here: it can then travel on
    as it is. None otherwise. The fd stays the mapping's (dup it to keep it)."""
    if not _mapped or view.nbytes == 0:
        return None
    start = address_of(view)
    with _lock:
        for base, mapping in _mapped.items():
            if base <= start and start + view.nbytes <= base + mapping.size:
                fd, size = mapping.fd, mapping.size
                break
        else:
            return None
    if _private_dirty(base, size):
        return None  # written here: what the next receiver would see is not the segment
    return fd, size, start - base


def _private_dirty(start: int, size: int) -> bool:
    """Whether the private mapping at start has a written (copied, anonymous) page.

    /proc/self/pagemap has a word per page: a present page that is not the
    file's own (bit 61 clear), or a swapped one (bit 62, only anonymous pages
    swap), was written here; an untouched page is neither.
    """
    first = start // PAGE
    pages = (start + size + PAGE - 1) // PAGE - first
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        words = bytearray(8 * pages)
        got = f.readinto(memoryview(words)) if f.seek(8 * first) == 8 * first else 0
    if got != len(words):
        return True  # cannot tell: treat as written (a copy is always right)
    flags = np.frombuffer(words, dtype=np.uint64)
    written = (flags & _SWAPPED) | ((flags & _PRESENT) & ~((flags & _FILE) << np.uint64(2)))
    return bool(written.any())


_PRESENT, _SWAPPED, _FILE = np.uint64(1 << 63), np.uint64(1 << 62), np.uint64(1 << 61)
