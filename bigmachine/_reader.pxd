# Compiles _reader.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

from bigmachine._threadstate cimport ThreadState, thread_state
from bigmachine._writer cimport Writer

cdef class Reader:
    cdef public object sock, fd, loop, tls, decoder, peer, name, on_event, is_closed
    cdef public object calls_in_flight, fail, io_failed
    cdef public Writer writer
    cdef public object receive_into, spin, last_recv, bytes_received
    cdef public object _deferred, _batch, _deadline, _lock, _state, _generation
    cdef public bint _lead_wanted
    cdef public object _leader, calls_all_on, _role_loop, _watching
    cdef public object _idle
    cdef public bint _idle_waiting
    cdef public object _threads
    cdef public bint _follow, _recalled, _callers_read, _loop_reading, _loop_looked_at

    cpdef ensure_reading(self, loop=*)
    cpdef bint _held_by_other(self, loop)
    cpdef bint _buffered(self)
    cpdef bint _run_deferred(self, generation)
    cpdef bint try_lead(self, waiter)
    cpdef bint leads(self, waiter)
    cpdef read_until(self, waiter)
    cpdef leave_if_leading(self, waiter)
    cpdef bint _read_loop(self, generation)
    cpdef bint _read_once(self, flags=*, generation=*)
