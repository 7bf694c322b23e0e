# cython: language_level=3
"""Aligned receive buffers, and private mappings of shared-memory segments.

Each incoming message's bytes land in memory allocated here: 64-byte aligned
(so numpy arrays built on it are aligned for any dtype and for SIMD), not
zero-filled (the socket overwrites every byte), and freed only when the last
view of it is gone (the buffer protocol keeps the owner alive). A segment
that arrived as a descriptor is mapped copy-on-write here, and unmapped (its
descriptor closed) when the last view of it is gone.
"""
from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo, PyBuffer_Release,
                             PyObject_GetBuffer)
from libc.stdlib cimport free
from libc.stdint cimport uintptr_t

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    int MADV_POPULATE_WRITE

cdef extern from "sys/mman.h" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE
    void *MAP_FAILED

from posix.unistd cimport close
from libc.errno cimport errno
import os

ALIGNMENT = 64
# Allocations at least this large ask the kernel for transparent huge pages:
# fewer page faults while the socket fills a fresh buffer.
HUGEPAGE_MIN = 8 << 20
HUGE_ALIGNMENT = 2 << 20


cdef class _Block:
    """A block of memory exported through the buffer protocol; subclasses own it."""

    cdef char *ptr
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t exports

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self):
        """The start address (tests use it to prove that no copy was made)."""
        return <uintptr_t>self.ptr


cdef class AlignedBuffer(_Block):
    """A writable, 64-byte aligned, uninitialised block of ``size`` bytes."""

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

    def __repr__(self):
        return f"<AlignedBuffer {self.size} bytes>"


def aligned(Py_ssize_t size):
    """Return a writable memoryview of a fresh aligned block of ``size`` bytes."""
    return memoryview(AlignedBuffer(size))


cdef class SharedMapping(_Block):
    """A private (copy-on-write) mapping of ``size`` bytes of the memfd ``fd``.

    It owns fd and closes it when the mapping goes, with the last view of it:
    while it lives the segment can be passed on by its descriptor.
    """

    cdef readonly int fd
    cdef object __weakref__

    def __cinit__(self, int fd, Py_ssize_t size):
        cdef void *p
        self.fd = -1
        if size <= 0:
            raise ValueError("a shared mapping needs a positive size")
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        self.ptr = <char *>p
        self.size = size
        self.fd = fd

    def __dealloc__(self):
        if self.ptr != NULL:
            munmap(self.ptr, self.size)
            self.ptr = NULL
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"<SharedMapping {self.size} bytes of fd {self.fd}>"


def prefault(buf) -> bool:
    """Fault in every page of a writable mapping now, without the GIL, so that
    writing it later takes no page fault (MADV_POPULATE_WRITE, Linux 5.14).
    False if the kernel would not: too old, or out of memory (what then
    happens on writing depends on the mapping)."""
    cdef Py_buffer view
    cdef int rc
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    try:
        with nogil:
            rc = madvise(view.buf, view.len, MADV_POPULATE_WRITE)
        return rc == 0
    finally:
        PyBuffer_Release(&view)


def address_of(buf) -> int:
    """Where the bytes of a buffer (read-only or not) start in this process's memory."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return <uintptr_t>view.buf
    finally:
        PyBuffer_Release(&view)
