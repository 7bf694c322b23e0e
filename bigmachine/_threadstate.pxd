cdef class ThreadState:
    cdef public object node     # the node this thread works for (_node.current_node)
    cdef public object served   # the call the sync method running here serves (_dispatch)
    cdef public object loop     # the event loop this thread runs (_waiters.on_loop_thread)
    cdef public object pending  # {loop: [(callback, args)]} while a read collects wake-ups (_waiters)

cpdef ThreadState thread_state()
