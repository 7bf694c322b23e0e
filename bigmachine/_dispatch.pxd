# Compiles _dispatch.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

from bigmachine._connection cimport Connection
from bigmachine._streams cimport Stream
from bigmachine._threadstate cimport ThreadState, thread_state

cdef class Served:
    cdef public Connection conn
    cdef public object sid, loop
    cdef public Stream stream
    cdef public object task, cond, wakeup, counter, started, reply
    cdef public bint failed

    cpdef send_reply(self)
    cpdef finish(self)

cdef class Dispatcher:
    cdef public object registry, executor, loop, node, counters, starting

cpdef _run_sync(Served served, fn, args, kwargs)
