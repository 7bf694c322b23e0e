# cython: language_level=3
"""Aligned receive buffers.

Each incoming message's bytes land in memory allocated here: 64-byte aligned
(so numpy arrays built on it are aligned for any dtype and for SIMD), not
zero-filled (the socket overwrites every byte), and freed only when the last
view of it is gone (the buffer protocol keeps the owner alive).
"""
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.stdlib cimport free
from libc.stdint cimport uintptr_t

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "sys/mman.h" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE

ALIGNMENT = 64
# Allocations at least this large ask the kernel for transparent huge pages:
# fewer page faults while the socket fills a fresh buffer.
HUGEPAGE_MIN = 8 << 20
HUGE_ALIGNMENT = 2 << 20


cdef class AlignedBuffer:
    """A writable, 64-byte aligned, uninitialised block of ``size`` bytes."""

    cdef char *ptr
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t exports

    def __cinit__(self, Py_ssize_t size):
        cdef void *p = NULL
        cdef size_t align = ALIGNMENT
        if size < 0:
            raise ValueError("negative buffer size")
        if size >= HUGEPAGE_MIN:
            align = HUGE_ALIGNMENT
        if posix_memalign(&p, align, size if size > 0 else 1) != 0:
            raise MemoryError(f"cannot allocate {size} bytes")
        if size >= HUGEPAGE_MIN:
            madvise(p, size, MADV_HUGEPAGE)  # advisory; failure is harmless
        self.ptr = <char *>p
        self.size = size

    def __dealloc__(self):
        if self.ptr != NULL:
            free(self.ptr)
            self.ptr = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self):
        """The start address, for tests that prove no copy was made."""
        return <uintptr_t>self.ptr

    def __repr__(self):
        return f"<AlignedBuffer {self.size} bytes>"


def aligned(Py_ssize_t size):
    """Return a writable memoryview of a fresh aligned block of ``size`` bytes."""
    return memoryview(AlignedBuffer(size))
