# Compiles _connection.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

from bigmachine._writer cimport Writer
from bigmachine._reader cimport Reader
from bigmachine._waiters cimport Waiter
cimport cython

cdef class Connection:
    cdef public object sock, node, addr_key, peer_name, tls, loop, peer, on_request, on_close
    cdef public object _parity, _sids, calls, incoming, _cancelled_early, gate, max_in_flight
    cdef public object _parked, _parking
    cdef public bint _resuming
    cdef public object _resumer, error, _uncork_on
    cdef public bint closed
    cdef public object _closing, pong_at, keepalive_rtts
    cdef public bint shm
    cdef public Writer writer
    cdef public object decoder
    cdef public Reader reader

    cpdef new_call(self, lead=*, loop=*, stream=*)
    cpdef send_control(self, kind, sid, value=*)
    cpdef bint send_in_turn(self, sid, mtype, mflags, segments, readonly, loop=*)
    cpdef _send_in_turn(self, sid, mtype, units, nbytes, fds, loop=*)
    cpdef _uncork(self)
    cpdef send(self, sid, mtype, mflags, segments, readonly, deadline=*, cork=*)
    cpdef bint over_room(self)
    cpdef bint _is_closed(self)
    cpdef bint _calls_in_flight(self)
    @cython.locals(waiter=Waiter)
    cpdef bint _calls_all_on(self, loop)
    cpdef _on_event(self, event)
    cpdef fail(self, error)
