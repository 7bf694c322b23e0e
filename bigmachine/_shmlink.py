"""Out-of-band buffers as shared memory on a Unix-socket link (see ``_shm``).

The sender turns each large buffer into a descriptor: the received,
unwritten segment that already holds it (passed on as it is, no copy), or a
copy in a segment of its pool (``_arena``), or, when the pool cannot take
it, a new sealed copy. The descriptors of one message travel in one ``sendmsg``
with its MSG frame's first byte (``_writer``); the receiver gets them with
``recvmsg`` (``_sockio.recv_into_with_fds``), the decoder gives each message
its own and maps them here (``map_received``).

A receiver that cannot take a segment (out of descriptors, so the kernel
dropped them; out of address space to map it) fails that message with
``ResourceError`` and keeps the connection; a segment its peer should not
have sent (unsealed, mis-sized) ends the connection as any malformed frame.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from . import _arena, _shm, _wire
from .errors import ProtocolError, ResourceError

# Out-of-band buffers at least this large travel as shared memory.
THRESHOLD = 1 << 20
AVAILABLE = _shm.AVAILABLE


def outgoing(segments: list) -> tuple[Optional[list], list]:
    """(shm, fds) for a message's segments: shm as message_frames takes it (None
    when every segment travels as bytes), fds the descriptors to send with it,
    owned by the caller."""
    shm: Optional[list] = None
    fds: list = []
    for i in range(1, len(segments)):
        view = segments[i]
        if memoryview(view).nbytes < THRESHOLD or len(fds) == _wire.MAX_FDS:
            continue
        try:
            found = _shm.find(memoryview(view))
            if found is not None:
                fd, size, offset = found
                fds.append(os.dup(fd))
            else:
                data = _shm.as_bytes(memoryview(view))
                fd, size = _arena.ARENA.lend(data) or (_shm.create(data), data.nbytes)
                fds.append(fd)
                offset = 0
        except OSError:
            continue  # out of descriptors or memory here: this one goes as bytes
        if shm is None:
            shm = [None] * len(segments)
        shm[i] = (size, offset)
    return shm, fds


def map_received(fd: int, size: int, offset: int, length: int, readonly: bool) -> Any:
    """The decoder's map_shm: the buffer of one received segment."""
    if fd < 0:
        return Unreceived(ResourceError(
            f"cannot receive a shared-memory segment of {length} bytes: "
            "this process is out of descriptors"))
    try:
        _shm.check(fd, size)
    except ProtocolError as exc:
        os.close(fd)
        raise _wire.WireError(exc.reason) from exc
    try:
        view = _shm.map_segment(fd, size)
    except OSError as exc:
        os.close(fd)
        return Unreceived(ResourceError(
            f"cannot map a shared-memory segment of {size} bytes: {exc}"))
    view = view[offset:offset + length]
    return view.toreadonly() if readonly else view


class Unreceived:
    """Stands for a segment this process could not take; loads raises its error."""

    __slots__ = ("error",)

    def __init__(self, error: ResourceError):
        self.error = error

