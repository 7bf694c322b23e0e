# cython: language_level=3
"""The frame layout's C-level names, shared by the codec (_wire.pyx) and the decoder."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cpdef enum:
    KIND_MSG = 1
    KIND_DATA = 2
    KIND_CANCEL = 3
    KIND_CREDIT = 4
    KIND_PING = 5
    KIND_PONG = 6
    KIND_GOAWAY = 7
    KIND_MAX = 7
    FLAG_INLINE = 1
    MTYPE_REQUEST = 1
    MTYPE_REPLY = 2
    MTYPE_ERROR = 3
    MTYPE_ITEM = 4
    MTYPE_END = 5
    MTYPE_MAX = 5
    MFLAG_STREAM = 1
    HEADER_SIZE = 16
    DESCRIPTOR_SIZE = 8
    ALIGN = 64
    SMALL_SEGMENT = 1 << 20    # smaller segments share one allocation

# The top bits of a segment length in a descriptor: read-only, shared memory.
cdef extern from *:
    """
    #define BM_SEG_READONLY (((uint64_t)1) << 63)
    #define BM_SEG_SHM (((uint64_t)1) << 62)
    #define BM_SEG_LENGTH (~(((uint64_t)3) << 62))
    """
    const uint64_t SEG_READONLY "BM_SEG_READONLY"
    const uint64_t SEG_SHM "BM_SEG_SHM"
    const uint64_t SEG_LENGTH "BM_SEG_LENGTH"


cdef inline uint64_t u64(const uint8_t *p) noexcept:
    cdef uint64_t v
    memcpy(&v, p, 8)  # the wire is little-endian, as is every host we run on
    return v


cdef inline uint32_t u32(const uint8_t *p) noexcept:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint16_t u16(const uint8_t *p) noexcept:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline void put_header(uint8_t *p, int kind, int flags, uint32_t stream_id,
                            uint64_t length) noexcept:
    p[0] = <uint8_t>kind
    p[1] = <uint8_t>flags
    p[2] = 0
    p[3] = 0
    memcpy(p + 4, &stream_id, 4)
    memcpy(p + 8, &length, 8)


cdef inline void put_descriptor(uint8_t *p, int mtype, int mflags, uint32_t nsegs) noexcept:
    p[0] = <uint8_t>mtype
    p[1] = <uint8_t>mflags
    p[2] = 0
    p[3] = 0
    memcpy(p + 4, &nsegs, 4)
