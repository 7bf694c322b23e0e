# cython: language_level=3, boundscheck=False, wraparound=False
"""Frame codec: the bytes of frames and messages (the decoder is _decoder.pyx).

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

The layout's C-level names (kinds, flags, sizes, the segment-length bits and
the helpers that read and write fields) are in _wire.pxd, which _decoder.pyx
cimports; its enums are this module's Python constants too.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint32_t, uint64_t

READONLY_BIT = SEG_READONLY
SHM_BIT = SEG_SHM
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
SCRATCH_SIZE = 256 << 10


class WireError(ValueError):
    """A frame is malformed or breaks a limit; the connection cannot go on."""


def encode_header(int kind, int flags, uint32_t stream_id, uint64_t length):
    """Return the 16 header bytes of one frame."""
    cdef bytearray out = bytearray(16)
    put_header(out, kind, flags, stream_id, length)
    return bytes(out)


def decode_header(const uint8_t[::1] data):
    """Return (kind, flags, stream_id, length) of the first 16 bytes of data."""
    if data.shape[0] < 16:
        raise WireError("short header")
    cdef const uint8_t *p = &data[0]
    if u16(p + 2) != 0:
        raise WireError("reserved header bits set")
    return p[0], p[1], u32(p + 4), u64(p + 8)


def control_frame(int kind, uint32_t stream_id, uint64_t value=0):
    """Return a whole CANCEL, CREDIT, PING, PONG or GOAWAY frame."""
    cdef bytearray out
    cdef uint8_t *p
    if kind == KIND_CANCEL:
        return encode_header(kind, 0, stream_id, 0)
    out = bytearray(24)
    p = out
    put_header(p, kind, 0, stream_id, 8)
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
    put_descriptor(p + 16, mtype, mflags, n32)
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
            ln |= SEG_SHM
        else:
            views.append(v)
            total += len(v)
        if readonly is not None and readonly[i]:
            ln |= SEG_READONLY
        memcpy(p + 24 + 8 * i, &ln, 8)
    cdef uint64_t flen
    cdef int flags = 0
    if total <= inline_max:
        flags = FLAG_INLINE
        flen = 8 + 8 * nsegs + 16 * nshm + total
    else:
        flen = 8 + 8 * nsegs + 16 * nshm
    put_header(p, KIND_MSG, flags, stream_id, flen)
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
        unit = [encode_header(KIND_DATA, 0, stream_id, room)]
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
        ln |= SEG_READONLY
    put_header(p, KIND_MSG, FLAG_INLINE, stream_id, flen)
    put_descriptor(p + 16, mtype, mflags, 1)
    memcpy(p + 24, &ln, 8)
    memcpy(p + 32, PyBytes_AS_STRING(payload), n)
    return [[frame]], 16 + <Py_ssize_t>flen
