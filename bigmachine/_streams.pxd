# Compiles _streams.py with its classes as extension types (see setup.py): attributes in
# C slots, and the methods of every small call's path called directly.

cdef class Stream:
    cdef public object sid, state, credits, consumed
