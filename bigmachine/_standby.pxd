# Compiles _standby.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

cdef class Standby:
    cdef public object _epoll, _stop_fd, _readers, _timed, _wake_at, _lock

    cpdef arm(self, fd, reader)
    cpdef disarm(self, fd, reader)
