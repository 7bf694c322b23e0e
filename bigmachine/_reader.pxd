# Compiles _reader.py with its class as an extension type (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

from bigmachine._role cimport Role
from bigmachine._threadstate cimport ThreadState, thread_state

cdef class Reader(Role):
    cdef public object _batch, _deadline
    cdef public bint _lead_wanted
    cdef public object _leader

    cpdef ensure_reading(self, loop=*)
    cpdef bint _run_deferred(self, generation)
    cpdef bint try_lead(self, waiter)
    cpdef bint leads(self, waiter)
    cpdef read_until(self, waiter)
    cpdef leave_if_leading(self, waiter)
    cpdef bint _read_loop(self, generation)
