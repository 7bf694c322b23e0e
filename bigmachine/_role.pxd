# Compiles _role.py with its class as an extension type (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

from bigmachine._threadstate cimport ThreadState, thread_state
from bigmachine._writer cimport Writer

cdef class Role:
    cdef public object sock, fd, loop, tls, decoder, peer, name, on_event, is_closed
    cdef public object calls_in_flight, calls_all_on, fail, io_failed
    cdef public Writer writer
    cdef public object receive_into, spin, last_recv, bytes_received
    cdef public object _deferred, _lock, _state, _generation
    cdef public object _idle, _role_loop, _watching
    cdef public bint _idle_waiting
    cdef public object _threads
    cdef public bint _follow, _recalled, _callers_read, _loop_reading, _loop_looked_at

    cpdef bint _held_by_other(self, loop)
    cpdef bint _buffered(self)
    cpdef bint _read_once(self, flags=*, generation=*)
