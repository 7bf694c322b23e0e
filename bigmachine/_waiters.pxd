# The classes of _waiters.pyx, declared for the modules that call them directly
# (_connection looks at every call's Waiter when it decides who reads).

cdef class Waiter:
    cdef readonly object items     # a deque
    cdef object lock               # a threading.Lock, once a thread caller waits
    cdef object loop               # the loop an asyncio caller awaits on
    cdef object future
    cdef readonly bint stream      # a stream's: its items come at the producer's pace

    cpdef bint awaits_on(self, loop)

cdef class Gate:
    cdef public Py_ssize_t limit
    cdef readonly Py_ssize_t used
    cdef readonly Py_ssize_t waiting     # threads waiting in acquire
    cdef object lock
    cdef object cond
    cdef object async_waiters

    cpdef bint try_acquire(self)
    cdef _wake_next(self)
