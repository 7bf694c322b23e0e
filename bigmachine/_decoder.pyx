# cython: language_level=3, boundscheck=False, wraparound=False
"""Sans-IO incremental frame decoder (the frame layout is described in _wire.pyx).

The decoder takes bytes, or hands out the exact buffer the next bytes should
land in (so bulk data goes from the socket straight to its final memory), and
returns events. It does no I/O. Every length is checked against a limit before
anything is allocated; anything malformed raises WireError.
"""
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.string cimport memmove
from posix.unistd cimport close as _close_fd
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from bigmachine._wire cimport (
    ALIGN, DESCRIPTOR_SIZE, FLAG_INLINE, HEADER_SIZE, KIND_CANCEL, KIND_CREDIT, KIND_DATA,
    KIND_MAX, KIND_MSG, MFLAG_STREAM, MTYPE_MAX, SEG_LENGTH, SEG_READONLY, SEG_SHM,
    SMALL_SEGMENT, u16, u32, u64,
)

from ._wire import (
    MAX_FDS, MAX_FRAME, MAX_MESSAGE, MAX_PENDING, MAX_SEGMENTS, SCRATCH_SIZE, WireError,
)


cdef class _Assembly:
    """A message whose segments are still arriving in DATA frames."""
    cdef uint32_t stream_id
    cdef int mtype, mflags
    cdef list targets      # writable views, in wire order
    cdef list results      # what the MSG event carries (read-only where flagged)
    cdef Py_ssize_t index, offset
    cdef Py_ssize_t remaining, size


cdef class Decoder:
    """Incremental frame decoder.

    Use either ``feed(data)`` or the pair ``get_buffer()`` /
    ``buffer_updated(n)`` (the asyncio.BufferedProtocol shape). Both return a
    list of events:

    - ``(KIND_MSG, stream_id, mtype, mflags, segments)``
    - ``(KIND_CANCEL, stream_id, 0)``, ``(KIND_CREDIT, stream_id, n)``
    - ``(KIND_PING, 0, token)``, ``(KIND_PONG, 0, token)``, ``(KIND_GOAWAY, 0, 0)``

    ``alloc(n)`` returns a writable buffer of n bytes for incoming segments
    (except the pickle stream of an inline message: a bytearray, copied
    straight out of the frame).

    ``map_shm(fd, size, offset, length, readonly)`` returns the buffer of a
    shared-memory segment; it owns fd (-1 when this process could not receive
    it: it then returns what stands for the lost segment) and raises WireError
    for a segment the peer should not have sent. Without it a message with
    shared-memory segments is malformed. ``add_fds`` gives the decoder the
    descriptors a receive brought, before the bytes that came with them.
    """

    cdef bytearray scratch
    cdef object scratch_view        # memoryview(scratch), made once: get_buffer slices it
    cdef Py_ssize_t start, end
    cdef object alloc
    cdef object map_shm
    cdef list fd_batches            # (fds, truncated) of receives, not yet claimed
    cdef dict assemblies
    cdef _Assembly current          # assembly the current DATA frame fills
    cdef Py_ssize_t data_left       # payload bytes left in the current DATA frame
    cdef bint direct                # get_buffer handed out a target, not scratch
    cdef readonly Py_ssize_t pending_bytes
    cdef readonly Py_ssize_t max_frame, max_segments, max_message, max_pending
    cdef readonly bint closed

    def __init__(self, alloc=bytearray, Py_ssize_t max_frame=MAX_FRAME,
                 Py_ssize_t max_segments=MAX_SEGMENTS,
                 Py_ssize_t max_message=MAX_MESSAGE,
                 Py_ssize_t max_pending=MAX_PENDING,
                 Py_ssize_t scratch_size=SCRATCH_SIZE, map_shm=None):
        self.scratch = bytearray(max(scratch_size, 64))
        self.scratch_view = memoryview(self.scratch)
        self.start = self.end = 0
        self.alloc = alloc
        self.map_shm = map_shm
        self.fd_batches = []
        self.assemblies = {}
        self.current = None
        self.data_left = 0
        self.direct = False
        self.pending_bytes = 0
        self.max_frame = max_frame
        self.max_segments = max_segments
        self.max_message = max_message
        self.max_pending = max_pending

    def __dealloc__(self):
        if self.fd_batches:
            for fds, truncated in self.fd_batches:
                _close_all(fds)

    @property
    def open_streams(self):
        """Stream ids with a message still arriving."""
        return list(self.assemblies)

    def get_buffer(self):
        """Return the writable buffer the next incoming bytes belong in."""
        cdef _Assembly a = self.current
        cdef Py_ssize_t n
        if self.data_left > 0 and self.start == self.end:
            target = a.targets[a.index]
            n = len(target) - a.offset
            if n > self.data_left:
                n = self.data_left
            self.direct = True
            return target[a.offset:a.offset + n]
        self.direct = False
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.scratch) - self.end < HEADER_SIZE + 4096 and self.start > 0:
            memmove(<char *>self.scratch, <char *>self.scratch + self.start,
                    self.end - self.start)
            self.end -= self.start
            self.start = 0
        if self.assemblies:
            # A message is arriving in DATA frames: read no further than the
            # end of the next header, so the payload after it lands in its
            # final buffer instead of being copied out of scratch.
            n = self._frame_end() - self.end
            if n > 0:
                return self.scratch_view[self.end:self.end + n]
        return self.scratch_view[self.end:]

    cdef Py_ssize_t _frame_end(self):
        """Scratch offset where the frame starting at self.start ends (or its header, if unknown)."""
        cdef const uint8_t *p
        cdef uint64_t length
        if self.end - self.start < HEADER_SIZE:
            return self.start + HEADER_SIZE
        p = <const uint8_t *>(<char *>self.scratch) + self.start
        length = u64(p + 8)
        if p[0] == KIND_DATA or length > <uint64_t>self.max_frame:
            return self.start + HEADER_SIZE
        return self.start + HEADER_SIZE + <Py_ssize_t>length

    def add_fds(self, list fds, bint truncated=False):
        """Descriptors one receive brought (truncated: some were lost on the way
        here, for want of descriptors); the message whose first byte came with
        them claims them. The decoder owns them from now on."""
        if self.closed or len(fds) > MAX_FDS:
            _close_all(fds)
            if not self.closed:
                raise WireError(f"{len(fds)} descriptors in one receive (limit {MAX_FDS})")
            return
        self.fd_batches.append((fds, truncated))

    def buffer_updated(self, Py_ssize_t n):
        """Record that n bytes were written into the last get_buffer() view."""
        cdef list events = []
        if n <= 0:
            return events
        if self.direct:
            self.direct = False
            self._advance(n, events)
        else:
            self.end += n
            self._process(events)
        if self.fd_batches:
            self._check_unclaimed()
        return events

    cdef _check_unclaimed(self):
        """Descriptors came with a message's first byte: at a frame boundary
        none may be left, and within a frame only that frame's batch."""
        if len(self.fd_batches) > 1 or (self.start == self.end and self.data_left == 0):
            self._close_fds()
            raise WireError("descriptors arrived that no message claimed")

    cdef _close_fds(self):
        for fds, truncated in self.fd_batches:
            _close_all(fds)
        self.fd_batches = []

    cdef list _claim_fds(self, Py_ssize_t n):
        """The n descriptors of the message being decoded; None when this process
        lost them on the way (it was out of descriptors)."""
        if self.map_shm is None:
            raise WireError("a shared-memory segment on a link without shared memory")
        if not self.fd_batches:
            raise WireError(f"a message promises {n} descriptors and none arrived")
        fds, truncated = self.fd_batches.pop(0)
        if truncated:
            _close_all(fds)
            return None
        if len(fds) != n:
            _close_all(fds)
            raise WireError(f"a message promises {n} descriptors and {len(fds)} arrived")
        return fds

    cdef dict _map_shared(self, list shared):
        """Segment index -> buffer for shared-memory segments (index, size, offset, length, ro)."""
        cdef list fds = self._claim_fds(len(shared))
        cdef dict out = {}
        cdef Py_ssize_t k = 0
        try:
            for k in range(len(shared)):
                i, size, offset, ln, ro = shared[k]
                out[i] = self.map_shm(fds[k] if fds is not None else -1, size, offset, ln, ro)
        except BaseException:
            if fds is not None:
                _close_all(fds[k + 1:])
            raise
        return out

    def feed(self, data):
        """Decode bytes; return the events they complete."""
        cdef const uint8_t[::1] src = memoryview(data).cast("B") if data else b""
        cdef Py_ssize_t pos = 0, total = src.shape[0], k
        cdef list events = []
        while pos < total:
            buf = self.get_buffer()
            k = len(buf)
            if k > total - pos:
                k = total - pos
            buf[:k] = src[pos:pos + k]
            pos += k
            events.extend(self.buffer_updated(k))
        return events

    cdef _advance(self, Py_ssize_t n, list events):
        """n bytes of the current DATA frame landed at the assembly's position."""
        cdef _Assembly a = self.current
        a.offset += n
        a.remaining -= n
        self.data_left -= n
        while a.index < len(a.targets) and a.offset == len(a.targets[a.index]):
            a.index += 1
            a.offset = 0
        if a.remaining == 0:
            del self.assemblies[a.stream_id]
            self.pending_bytes -= a.size
            self.current = None
            events.append((KIND_MSG, a.stream_id, a.mtype, a.mflags, a.results))

    cdef _copy_in(self, Py_ssize_t take, list events):
        """Copy take bytes from scratch into the current assembly."""
        cdef _Assembly a
        cdef Py_ssize_t n
        cdef const uint8_t[::1] src
        while take > 0:
            a = self.current
            target = a.targets[a.index]
            n = len(target) - a.offset
            if n > take:
                n = take
            target[a.offset:a.offset + n] = self.scratch_view[self.start:self.start + n]
            self.start += n
            take -= n
            self._advance(n, events)

    cdef _process(self, list events):
        cdef const uint8_t *p
        cdef Py_ssize_t avail, take
        cdef int kind, flags
        cdef uint32_t sid
        cdef uint64_t length
        while True:
            avail = self.end - self.start
            if self.data_left > 0:
                take = self.data_left if self.data_left < avail else avail
                if take == 0:
                    return
                self._copy_in(take, events)
                continue
            if avail < HEADER_SIZE:
                return
            p = <const uint8_t *>(<char *>self.scratch) + self.start
            kind = p[0]
            flags = p[1]
            sid = u32(p + 4)
            length = u64(p + 8)
            if u16(p + 2) != 0:
                raise WireError("reserved header bits set")
            if kind < 1 or kind > KIND_MAX:
                raise WireError(f"unknown frame kind {kind}")
            if length > <uint64_t>self.max_frame:
                raise WireError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
            # A control frame's payload size is fixed: reject a wrong one now,
            # rather than buffer up to max_frame bytes of it first.
            if kind >= KIND_CANCEL and length != (0 if kind == KIND_CANCEL else 8):
                raise WireError(f"control frame kind {kind} of {length} bytes")
            if kind == KIND_DATA:
                self._start_data(sid, flags, length)
                self.start += HEADER_SIZE
                continue
            if avail < HEADER_SIZE + <Py_ssize_t>length:
                if HEADER_SIZE + <Py_ssize_t>length > len(self.scratch):
                    self._grow(HEADER_SIZE + <Py_ssize_t>length)
                return
            self._frame(kind, flags, sid, <Py_ssize_t>length, p + HEADER_SIZE, events)
            self.start += HEADER_SIZE + <Py_ssize_t>length

    cdef _grow(self, Py_ssize_t need):
        cdef bytearray bigger = bytearray(need + 4096)
        cdef Py_ssize_t live = self.end - self.start
        bigger[:live] = self.scratch_view[self.start:self.end]
        self.scratch_view.release()
        self.scratch = bigger
        self.scratch_view = memoryview(bigger)
        self.start = 0
        self.end = live

    cdef _alloc(self, Py_ssize_t n):
        # A message within the limits that this host still cannot hold is the
        # peer's problem too: the connection ends like on any bad frame.
        try:
            return self.alloc(n)
        except MemoryError:
            raise WireError(f"cannot allocate {n} bytes for an incoming message")

    cdef _start_data(self, uint32_t sid, int flags, uint64_t length):
        cdef _Assembly a = self.assemblies.get(sid)
        if flags != 0:
            raise WireError(f"DATA frame with flags {flags}")
        if a is None:
            raise WireError(f"DATA frame for stream {sid} with no message arriving")
        if length == 0 or length > <uint64_t>a.remaining:
            raise WireError(f"DATA frame of {length} bytes; stream {sid} expects {a.remaining}")
        self.current = a
        self.data_left = <Py_ssize_t>length

    cdef _frame(self, int kind, int flags, uint32_t sid, Py_ssize_t length,
                const uint8_t *body, list events):
        cdef uint64_t value
        if kind == KIND_MSG:
            self._message(flags, sid, length, body, events)
            return
        if flags != 0:
            raise WireError(f"control frame with flags {flags}")
        if kind == KIND_CANCEL:
            if length != 0 or sid == 0:
                raise WireError("malformed CANCEL frame")
            events.append((kind, sid, 0))
            return
        if length != 8:
            raise WireError(f"control frame kind {kind} must carry 8 bytes, not {length}")
        value = u64(body)
        if kind == KIND_CREDIT:
            if sid == 0:
                raise WireError("CREDIT frame on stream 0")
        elif sid != 0:
            raise WireError(f"connection frame kind {kind} on stream {sid}")
        events.append((kind, sid, value))

    cdef _message(self, int flags, uint32_t sid, Py_ssize_t length,
                  const uint8_t *body, list events):
        cdef int mtype, mflags
        cdef uint32_t nsegs
        cdef Py_ssize_t i, total = 0, region = 0, off, pos
        cdef uint64_t raw, ln
        cdef Py_ssize_t ln_i, k
        cdef uint64_t size, offset
        cdef bint ro
        if sid == 0:
            raise WireError("message on stream 0")
        if flags & ~FLAG_INLINE:
            raise WireError(f"unknown MSG flags {flags}")
        if sid in self.assemblies:
            raise WireError(f"stream {sid} already has a message arriving")
        if length < DESCRIPTOR_SIZE:
            raise WireError("short message descriptor")
        mtype = body[0]
        mflags = body[1]
        if mtype < 1 or mtype > MTYPE_MAX:
            raise WireError(f"unknown message type {mtype}")
        if mflags & ~MFLAG_STREAM or u16(body + 2) != 0:
            raise WireError("unknown message flags")
        nsegs = u32(body + 4)
        if nsegs == 0 or nsegs > <uint32_t>self.max_segments:
            raise WireError(f"message with {nsegs} segments (limit {self.max_segments})")
        if length < DESCRIPTOR_SIZE + 8 * <Py_ssize_t>nsegs:
            raise WireError("truncated message descriptor")
        lengths = []
        shared = []
        for i in range(nsegs):
            raw = u64(body + DESCRIPTOR_SIZE + 8 * i)
            ln = raw & SEG_LENGTH
            if ln > <uint64_t>self.max_message:
                raise WireError(f"message larger than the limit of {self.max_message} bytes")
            if raw & SEG_SHM:
                if len(shared) >= MAX_FDS:
                    raise WireError(f"a message with more than {MAX_FDS} shared segments")
                shared.append(i)
                lengths.append((-1, (raw & SEG_READONLY) != 0))
                continue
            if total + <Py_ssize_t>ln > self.max_message:
                raise WireError(f"message larger than the limit of {self.max_message} bytes")
            total += <Py_ssize_t>ln
            lengths.append((<Py_ssize_t>ln, (raw & SEG_READONLY) != 0))
        pos = DESCRIPTOR_SIZE + 8 * nsegs
        if length < pos + 16 * <Py_ssize_t>len(shared):
            raise WireError("truncated shared-memory table")
        for k in range(len(shared)):
            i = shared[k]
            ln = u64(body + DESCRIPTOR_SIZE + 8 * i) & SEG_LENGTH
            size = u64(body + pos)
            offset = u64(body + pos + 8)
            pos += 16
            if size > <uint64_t>self.max_message or offset > size or ln > size - offset:
                raise WireError(f"a shared segment of {ln} bytes at {offset} "
                                f"in a memfd of {size} bytes")
            shared[k] = (i, size, offset, ln, lengths[i][1])
        if flags & FLAG_INLINE:
            if length != pos + total:
                raise WireError("inline message length does not match its segments")
            mapped = self._map_shared(shared) if shared else None
            segments = []
            for i in range(nsegs):
                ln_i, ro = lengths[i]
                if ln_i < 0:
                    segments.append(mapped[i])
                    continue
                if i == 0:
                    # The pickle stream: only unpickling reads it, so it needs
                    # no alignment and no call out to alloc (a small call's cost).
                    seg = PyByteArray_FromStringAndSize(
                        <char *>self.scratch + self.start + HEADER_SIZE + pos, ln_i)
                    pos += ln_i
                    segments.append(memoryview(seg).toreadonly() if ro else seg)
                    continue
                seg = self._alloc(ln_i)
                if ln_i:
                    memoryview(seg)[:] = self.scratch_view[
                        self.start + HEADER_SIZE + pos:self.start + HEADER_SIZE + pos + ln_i]
                pos += ln_i
                segments.append(memoryview(seg).toreadonly() if ro else seg)
            events.append((KIND_MSG, sid, mtype, mflags, segments))
            return
        if length != pos:
            raise WireError("message descriptor has trailing bytes")
        if total == 0:
            raise WireError("empty message sent as DATA frames")
        if self.pending_bytes + total > self.max_pending:
            raise WireError(f"{self.pending_bytes + total} bytes of messages arriving "
                            f"exceed the limit of {self.max_pending}")
        # Lengths are checked; now allocate. Small segments share one region
        # (at aligned offsets), large ones get their own memory.
        for ln_i, ro in lengths:
            if 0 <= ln_i < SMALL_SEGMENT:
                region += (ln_i + ALIGN - 1) & ~(ALIGN - 1)
        mapped = self._map_shared(shared) if shared else None
        small = memoryview(self._alloc(region) if region else bytearray())  # all may be empty
        cdef _Assembly a = _Assembly()
        a.stream_id = sid
        a.mtype = mtype
        a.mflags = mflags
        a.targets = []
        a.results = []
        off = 0
        for i in range(nsegs):
            ln_i, ro = lengths[i]
            if ln_i < 0:
                a.results.append(mapped[i])
                continue
            if ln_i < SMALL_SEGMENT:
                view = small[off:off + ln_i]
                off += (ln_i + ALIGN - 1) & ~(ALIGN - 1)
            else:
                view = memoryview(self._alloc(ln_i))
            if ln_i:
                a.targets.append(view)
            a.results.append(view.toreadonly() if ro else view)
        a.index = a.offset = 0
        a.remaining = a.size = total
        self.assemblies[sid] = a
        self.pending_bytes += total

    def close(self):
        """Drop partial messages; return the stream ids that had one arriving."""
        sids = list(self.assemblies)
        self.assemblies.clear()
        self.current = None
        self.data_left = 0
        self.pending_bytes = 0
        self.closed = True
        self._close_fds()
        return sids


cdef _close_all(list fds):
    for fd in fds:
        _close_fd(fd)
