# cython: language_level=3, boundscheck=False, wraparound=False
"""Frame codec and sans-IO incremental decoder.

Every frame starts with a 16-byte little-endian header::

    u8 kind | u8 flags | u16 reserved (0) | u32 stream id | u64 payload length

Kinds:

- MSG: starts a message on a stream. Its payload is a descriptor
  ``u8 mtype | u8 mflags | u16 0 | u32 nsegs`` followed by ``nsegs`` u64
  segment lengths (bit 63 marks a read-only segment, bit 62 a shared-memory
  one). Segment 0 is the pickle stream, the rest are out-of-band buffers.
  For each shared-memory segment, in order, two u64 follow the lengths: the
  size of the memfd that holds it and its offset there; the k-th such
  segment is the k-th descriptor of the batch that arrived (SCM_RIGHTS) with
  the MSG frame's first byte, and its bytes never travel on the socket.
  With FLAG_INLINE the other segments' bytes follow the descriptor in the same
  frame; otherwise DATA frames carry them.
- DATA: the next bytes of the message being received on that stream.
- CANCEL (no payload), CREDIT (u64 count): per-stream control.
- PING, PONG (u64 token), GOAWAY (u64 0): connection-level, stream id 0.

The decoder takes bytes, or hands out the exact buffer the next bytes should
land in (so bulk data goes from the socket straight to its final memory), and
returns events. It does no I/O. Every length is checked against a limit before
anything is allocated; anything malformed raises WireError.
"""
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memmove
from posix.unistd cimport close as _close_fd
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    _KIND_MSG = 1
    _KIND_DATA = 2
    _KIND_CANCEL = 3
    _KIND_CREDIT = 4
    _KIND_PING = 5
    _KIND_PONG = 6
    _KIND_GOAWAY = 7
    _KIND_MAX = 7
    _FLAG_INLINE = 1
    _MTYPE_REQUEST = 1
    _MTYPE_REPLY = 2
    _MTYPE_ERROR = 3
    _MTYPE_ITEM = 4
    _MTYPE_END = 5
    _MTYPE_MAX = 5
    _MFLAG_STREAM = 1

cdef uint64_t _READONLY_BIT = (<uint64_t>1) << 63
cdef uint64_t _SHM_BIT = (<uint64_t>1) << 62
cdef uint64_t _LENGTH_MASK = ~((<uint64_t>3) << 62)

cdef enum:
    _HEADER = 16
    _DESCRIPTOR = 8
    _ALIGN = 64
    _SMALL_SEGMENT = 1 << 20

HEADER_SIZE = _HEADER
DESCRIPTOR_SIZE = _DESCRIPTOR

KIND_MSG = _KIND_MSG
KIND_DATA = _KIND_DATA
KIND_CANCEL = _KIND_CANCEL
KIND_CREDIT = _KIND_CREDIT
KIND_PING = _KIND_PING
KIND_PONG = _KIND_PONG
KIND_GOAWAY = _KIND_GOAWAY
KIND_MAX = _KIND_MAX

FLAG_INLINE = _FLAG_INLINE

MTYPE_REQUEST = _MTYPE_REQUEST
MTYPE_REPLY = _MTYPE_REPLY
MTYPE_ERROR = _MTYPE_ERROR
MTYPE_ITEM = _MTYPE_ITEM
MTYPE_END = _MTYPE_END
MTYPE_MAX = _MTYPE_MAX

MFLAG_STREAM = _MFLAG_STREAM

READONLY_BIT = 1 << 63
SHM_BIT = 1 << 62
# Descriptors one message may carry: Linux passes at most 253 per sendmsg.
MAX_FDS = 253
MAX_STREAM_ID = 0xFFFFFFFF

# Default limits; each Decoder may be given tighter or looser ones.
MAX_FRAME = 16 << 20          # payload of any single frame
MAX_SEGMENTS = 1 << 16        # out-of-band buffers in one message, plus one
MAX_MESSAGE = 1 << 36         # bytes in one message (64 GiB)
MAX_PENDING = 1 << 37         # bytes allocated for messages still arriving
INLINE_MAX = 64 << 10         # messages up to this size travel in one frame
CHUNK = 1 << 20               # DATA frame size when a message is cut up
SMALL_SEGMENT = _SMALL_SEGMENT  # smaller segments share one allocation
ALIGN = _ALIGN
SCRATCH_SIZE = 256 << 10


class WireError(ValueError):
    """A frame is malformed or breaks a limit; the connection cannot go on."""


cdef inline uint64_t _u64(const uint8_t *p) noexcept:
    cdef uint64_t v
    memcpy(&v, p, 8)  # the wire is little-endian, as is every host we run on
    return v


cdef inline uint32_t _u32(const uint8_t *p) noexcept:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t _u16(const uint8_t *p) noexcept:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline void _put_header(uint8_t *p, int kind, int flags, uint32_t stream_id,
                             uint64_t length) noexcept:
    p[0] = <uint8_t>kind
    p[1] = <uint8_t>flags
    p[2] = 0
    p[3] = 0
    memcpy(p + 4, &stream_id, 4)
    memcpy(p + 8, &length, 8)


cdef inline void _put_descriptor(uint8_t *p, int mtype, int mflags, uint32_t nsegs) noexcept:
    p[0] = <uint8_t>mtype
    p[1] = <uint8_t>mflags
    p[2] = 0
    p[3] = 0
    memcpy(p + 4, &nsegs, 4)


def encode_header(int kind, int flags, uint32_t stream_id, uint64_t length):
    """Return the 16 header bytes of one frame."""
    cdef bytearray out = bytearray(16)
    _put_header(out, kind, flags, stream_id, length)
    return bytes(out)


def decode_header(const uint8_t[::1] data):
    """Return (kind, flags, stream_id, length) of the first 16 bytes of data."""
    if data.shape[0] < 16:
        raise WireError("short header")
    cdef const uint8_t *p = &data[0]
    if _u16(p + 2) != 0:
        raise WireError("reserved header bits set")
    return p[0], p[1], _u32(p + 4), _u64(p + 8)


def control_frame(int kind, uint32_t stream_id, uint64_t value=0):
    """Return a whole CANCEL, CREDIT, PING, PONG or GOAWAY frame."""
    cdef bytearray out
    cdef uint8_t *p
    if kind == _KIND_CANCEL:
        return encode_header(kind, 0, stream_id, 0)
    out = bytearray(24)
    p = out
    _put_header(p, kind, 0, stream_id, 8)
    memcpy(p + 16, &value, 8)
    return bytes(out)


def message_frames(uint32_t stream_id, int mtype, int mflags, list segments,
                   list readonly=None, Py_ssize_t inline_max=INLINE_MAX,
                   Py_ssize_t chunk=CHUNK, list shm=None):
    """Cut one message into frames without copying its segments.

    segments: bytes-like objects (segment 0 is the pickle stream).
    shm: None, or for each segment None or (memfd size, offset): that segment
    travels as a descriptor the caller sends with the first unit.
    Returns (units, nbytes): units is a list of lists of buffers, each inner
    list being whole frames to write together with one gather write; the first
    unit holds the MSG frame, the rest DATA frames of at most ``chunk`` bytes.
    """
    cdef Py_ssize_t nsegs = len(segments)
    cdef Py_ssize_t i, total = 0, n, off, take, room, nshm = 0, table
    cdef uint64_t ln, word
    cdef list views = []
    cdef bytearray head
    cdef uint8_t *p
    cdef uint32_t n32 = <uint32_t>nsegs
    if nsegs == 1 and shm is None and type(segments[0]) is bytes and len(segments[0]) <= inline_max:
        return _small_message(stream_id, mtype, mflags, <bytes>segments[0],
                              readonly is not None and bool(readonly[0]))
    if nsegs == 0 or nsegs > MAX_SEGMENTS:
        raise WireError(f"a message has 1 to {MAX_SEGMENTS} segments, not {nsegs}")
    if shm is not None:
        if len(shm) != nsegs:
            raise WireError("shm must say, for each segment, whether it is shared")
        for i in range(nsegs):
            if shm[i] is not None:
                nshm += 1
        if nshm > MAX_FDS:
            raise WireError(f"a message carries at most {MAX_FDS} descriptors, not {nshm}")
    table = 16 + 8 + 8 * nsegs
    head = bytearray(table + 16 * nshm)
    p = head
    _put_descriptor(p + 16, mtype, mflags, n32)
    for i in range(nsegs):
        v = memoryview(segments[i])
        if v.ndim != 1 or v.itemsize != 1 or not v.c_contiguous:
            v = v.cast("B") if v.c_contiguous else memoryview(v.tobytes())
        ln = <uint64_t>len(v)
        if nshm and shm[i] is not None:
            word = <uint64_t>shm[i][0]
            memcpy(p + table, &word, 8)
            word = <uint64_t>shm[i][1]
            memcpy(p + table + 8, &word, 8)
            table += 16
            ln |= _SHM_BIT
        else:
            views.append(v)
            total += len(v)
        if readonly is not None and readonly[i]:
            ln |= _READONLY_BIT
        memcpy(p + 24 + 8 * i, &ln, 8)
    cdef uint64_t flen
    cdef int flags = 0
    if total <= inline_max:
        flags = _FLAG_INLINE
        flen = 8 + 8 * nsegs + 16 * nshm + total
    else:
        flen = 8 + 8 * nsegs + 16 * nshm
    _put_header(p, _KIND_MSG, flags, stream_id, flen)
    if flags:
        unit = [bytes(head)]
        for v in views:
            if len(v):
                unit.append(v)
        return [unit], 16 + flen
    units = [[bytes(head)]]
    # DATA frames of up to `chunk` bytes, each spanning segments as needed.
    i = 0
    off = 0
    cdef Py_ssize_t left = total
    while left > 0:
        room = chunk if chunk < left else left
        unit = [encode_header(_KIND_DATA, 0, stream_id, room)]
        left -= room
        while room > 0:
            n = len(views[i]) - off
            if n == 0:
                i += 1
                off = 0
                continue
            take = n if n < room else room
            unit.append(views[i][off:off + take] if (off or take != n) else views[i])
            off += take
            room -= take
        units.append(unit)
    return units, 16 + flen + total + 16 * (len(units) - 1)


cdef tuple _small_message(uint32_t stream_id, int mtype, int mflags, bytes payload, bint readonly):
    """message_frames of a message of one small bytes segment: one buffer, made in one step."""
    cdef Py_ssize_t n = len(payload)
    cdef uint64_t flen = 8 + 8 + <uint64_t>n
    cdef uint64_t ln = <uint64_t>n
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, 16 + <Py_ssize_t>flen)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(frame)
    if readonly:
        ln |= _READONLY_BIT
    _put_header(p, _KIND_MSG, _FLAG_INLINE, stream_id, flen)
    _put_descriptor(p + 16, mtype, mflags, 1)
    memcpy(p + 24, &ln, 8)
    memcpy(p + 32, PyBytes_AS_STRING(payload), n)
    return [[frame]], 16 + <Py_ssize_t>flen


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

    - ``(_KIND_MSG, stream_id, mtype, mflags, segments)``
    - ``(_KIND_CANCEL, stream_id, 0)``, ``(_KIND_CREDIT, stream_id, n)``
    - ``(_KIND_PING, 0, token)``, ``(_KIND_PONG, 0, token)``, ``(_KIND_GOAWAY, 0, 0)``

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
        elif len(self.scratch) - self.end < _HEADER + 4096 and self.start > 0:
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
        if self.end - self.start < _HEADER:
            return self.start + _HEADER
        p = <const uint8_t *>(<char *>self.scratch) + self.start
        length = _u64(p + 8)
        if p[0] == _KIND_DATA or length > <uint64_t>self.max_frame:
            return self.start + _HEADER
        return self.start + _HEADER + <Py_ssize_t>length

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
            events.append((_KIND_MSG, a.stream_id, a.mtype, a.mflags, a.results))

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
            if avail < _HEADER:
                return
            p = <const uint8_t *>(<char *>self.scratch) + self.start
            kind = p[0]
            flags = p[1]
            sid = _u32(p + 4)
            length = _u64(p + 8)
            if _u16(p + 2) != 0:
                raise WireError("reserved header bits set")
            if kind < 1 or kind > _KIND_MAX:
                raise WireError(f"unknown frame kind {kind}")
            if length > <uint64_t>self.max_frame:
                raise WireError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
            # A control frame's payload size is fixed: reject a wrong one now,
            # rather than buffer up to max_frame bytes of it first.
            if kind >= _KIND_CANCEL and length != (0 if kind == _KIND_CANCEL else 8):
                raise WireError(f"control frame kind {kind} of {length} bytes")
            if kind == _KIND_DATA:
                self._start_data(sid, flags, length)
                self.start += _HEADER
                continue
            if avail < _HEADER + <Py_ssize_t>length:
                if _HEADER + <Py_ssize_t>length > len(self.scratch):
                    self._grow(_HEADER + <Py_ssize_t>length)
                return
            self._frame(kind, flags, sid, <Py_ssize_t>length, p + _HEADER, events)
            self.start += _HEADER + <Py_ssize_t>length

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
        if kind == _KIND_MSG:
            self._message(flags, sid, length, body, events)
            return
        if flags != 0:
            raise WireError(f"control frame with flags {flags}")
        if kind == _KIND_CANCEL:
            if length != 0 or sid == 0:
                raise WireError("malformed CANCEL frame")
            events.append((kind, sid, 0))
            return
        if length != 8:
            raise WireError(f"control frame kind {kind} must carry 8 bytes, not {length}")
        value = _u64(body)
        if kind == _KIND_CREDIT:
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
        if flags & ~_FLAG_INLINE:
            raise WireError(f"unknown MSG flags {flags}")
        if sid in self.assemblies:
            raise WireError(f"stream {sid} already has a message arriving")
        if length < _DESCRIPTOR:
            raise WireError("short message descriptor")
        mtype = body[0]
        mflags = body[1]
        if mtype < 1 or mtype > _MTYPE_MAX:
            raise WireError(f"unknown message type {mtype}")
        if mflags & ~_MFLAG_STREAM or _u16(body + 2) != 0:
            raise WireError("unknown message flags")
        nsegs = _u32(body + 4)
        if nsegs == 0 or nsegs > <uint32_t>self.max_segments:
            raise WireError(f"message with {nsegs} segments (limit {self.max_segments})")
        if length < _DESCRIPTOR + 8 * <Py_ssize_t>nsegs:
            raise WireError("truncated message descriptor")
        lengths = []
        shared = []
        for i in range(nsegs):
            raw = _u64(body + _DESCRIPTOR + 8 * i)
            ln = raw & _LENGTH_MASK
            if ln > <uint64_t>self.max_message:
                raise WireError(f"message larger than the limit of {self.max_message} bytes")
            if raw & _SHM_BIT:
                if len(shared) >= MAX_FDS:
                    raise WireError(f"a message with more than {MAX_FDS} shared segments")
                shared.append(i)
                lengths.append((-1, (raw & _READONLY_BIT) != 0))
                continue
            if total + <Py_ssize_t>ln > self.max_message:
                raise WireError(f"message larger than the limit of {self.max_message} bytes")
            total += <Py_ssize_t>ln
            lengths.append((<Py_ssize_t>ln, (raw & _READONLY_BIT) != 0))
        pos = _DESCRIPTOR + 8 * nsegs
        if length < pos + 16 * <Py_ssize_t>len(shared):
            raise WireError("truncated shared-memory table")
        for k in range(len(shared)):
            i = shared[k]
            ln = _u64(body + _DESCRIPTOR + 8 * i) & _LENGTH_MASK
            size = _u64(body + pos)
            offset = _u64(body + pos + 8)
            pos += 16
            if size > <uint64_t>self.max_message or offset > size or ln > size - offset:
                raise WireError(f"a shared segment of {ln} bytes at {offset} "
                                f"in a memfd of {size} bytes")
            shared[k] = (i, size, offset, ln, lengths[i][1])
        if flags & _FLAG_INLINE:
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
                        <char *>self.scratch + self.start + _HEADER + pos, ln_i)
                    pos += ln_i
                    segments.append(memoryview(seg).toreadonly() if ro else seg)
                    continue
                seg = self._alloc(ln_i)
                if ln_i:
                    memoryview(seg)[:] = self.scratch_view[
                        self.start + _HEADER + pos:self.start + _HEADER + pos + ln_i]
                pos += ln_i
                segments.append(memoryview(seg).toreadonly() if ro else seg)
            events.append((_KIND_MSG, sid, mtype, mflags, segments))
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
            if 0 <= ln_i < _SMALL_SEGMENT:
                region += (ln_i + _ALIGN - 1) & ~(_ALIGN - 1)
        mapped = self._map_shared(shared) if shared else None
        small = memoryview(self._alloc(region)) if region else None
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
            if ln_i < _SMALL_SEGMENT:
                view = small[off:off + ln_i]
                off += (ln_i + _ALIGN - 1) & ~(_ALIGN - 1)
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
