# cython: language_level=3
"""What a thread is to bigmachine: its node, the call it serves, the loop it
runs, the loop wake-ups it collects.

Each was a ``threading.local``, whose every write cost ~550 instructions (a
lookup of the thread's own dict, then a generic attribute write) and every
read ~150; a small call made nine writes. One object per thread, kept in
CPython's per-thread dict (which is cleared when the thread ends) and found
with one lookup, holds them all in C slots.
"""
from cpython.dict cimport PyDict_GetItem
from cpython.pystate cimport PyThreadState_GetDict
from cpython.ref cimport PyObject

# An object no other code can name: nothing else can store under it.
cdef object _KEY = object()


cdef class ThreadState:
    """One thread's state (fields: see _threadstate.pxd)."""


cpdef ThreadState thread_state():
    """The calling thread's state, made on its first use."""
    cdef PyObject* found
    cdef PyObject* d = PyThreadState_GetDict()
    if d == NULL:  # the thread's dict could not be made
        raise MemoryError("no per-thread dict for bigmachine's thread state")
    cdef dict per_thread = <dict>d
    found = PyDict_GetItem(per_thread, _KEY)
    if found != NULL:
        return <ThreadState>found
    state = ThreadState()
    per_thread[_KEY] = state
    return state


def swap_node(node: object) -> object:
    """Make node the calling thread's node (_node.current_node); return the one it replaces."""
    cdef ThreadState state = thread_state()
    previous = state.node
    state.node = node
    return previous
