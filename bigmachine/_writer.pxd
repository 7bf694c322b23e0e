# Compiles _writer.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

cdef class Writer:
    cdef public object sock, loop, tls, io_failed, lost
    cdef public object fd, max_queued, queued, bytes_sent
    cdef public bint closed
    cdef public object _ciphertext, _lock, _drained, _async_drained, _streams
    cdef public bint _armed
    cdef public object _cork_owner, _corked, _corked_bytes, _corked_count, _corked_sids
    cdef public object _behind_corked

    cpdef enqueue(self, sid, units, nbytes, cork=*, fds=*)
    cpdef bint enqueue_in_turn(self, sid, units, nbytes, fds=*, bint first_now=*)
    cpdef _enqueue(self, sid, units, nbytes, bint cork, fds)
    cpdef bint cork(self)
    cpdef _unplug(self)
    cpdef _send(self, sid, units, nbytes, fds=*)
