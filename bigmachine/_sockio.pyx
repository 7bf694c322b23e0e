# cython: language_level=3
"""The two socket calls every small call makes, without the socket module's overhead.

``socket.recvmsg_into`` and ``socket.sendmsg`` parse their arguments, build
an ancillary buffer object and a result tuple on every call: 5-8 thousand
instructions a receive, a sixth of a ping's. These do the same system calls
for the connection's reader and writer and behave as the socket methods do:
a blocking receive releases the GIL, EINTR is retried once signal handlers
have run, and a failure raises the OSError subclass its errno names. Received
descriptors are close-on-exec (MSG_CMSG_CLOEXEC), so a subprocess started
meanwhile does not inherit a shared-memory segment.

The socket is passed, not its number, and asked for its number on each call:
a closed socket then fails with EBADF instead of reading a reused number.
A thread blocked in a receive is in ``_profile.WAITING`` meanwhile: compiled
code leaves the sampling profiler no frame to know the wait by.

A blocking receive given a ``Spin`` busy-polls (non-blocking receives, the
CPU yielded between them) for up to its window before it sleeps, when the
last wait it timed was shorter than that: a ping whose reply comes in 20 us
then never puts its thread to sleep, which on a VM also lets the vCPU halt,
and waking both costs more than the reply took (a sync ping: 80 us sleeping,
22 us polling). A receive that finds data already there teaches nothing, so
a connection that is idle for longer than the window sleeps at once, and
polls in vain at most once after a burst of traffic.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.set cimport PySet_Add, PySet_Discard
from libc cimport errno as c_errno
from libc.stdlib cimport free, malloc

from ._profile import WAITING
from ._wire import MAX_FDS

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr*)
    cmsghdr* CMSG_NXTHDR(msghdr*, cmsghdr*)
    unsigned char* CMSG_DATA(cmsghdr*)
    size_t CMSG_LEN(size_t)
    size_t CMSG_SPACE(size_t)
    ssize_t recvmsg(int, msghdr*, int)
    ssize_t sendmsg(int, const msghdr*, int)
    int SOL_SOCKET, SCM_RIGHTS, MSG_CTRUNC, MSG_CMSG_CLOEXEC, MSG_DONTWAIT

cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int, timespec*)
    int CLOCK_MONOTONIC

cdef extern from "sched.h" nogil:
    int sched_yield()

cdef extern from "sys/epoll.h" nogil:
    struct epoll_event:
        unsigned int events
    int epoll_wait(int, epoll_event*, int, int)

cdef enum:
    # Room for MAX_FDS descriptors' control message, in words so that it is aligned.
    CONTROL_WORDS = 160
    # Buffers a sendmsg takes at most (Linux's IOV_MAX); the first few live on the stack.
    MAX_IOV = 1024
    IOV_STACK = 8
    # A send holds the GIL below this many bytes: it only copies into the socket's buffer.
    SEND_NOGIL = 65536

IOV_MAX = MAX_IOV  # for the writer, which cuts longer lists of buffers into several sends
cdef set _waiting = WAITING
cdef size_t _control_len = CMSG_SPACE(MAX_FDS * sizeof(int))
if _control_len > CONTROL_WORDS * sizeof(size_t):
    raise ImportError(f"_sockio: {MAX_FDS} descriptors need {_control_len} bytes of control buffer")


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef class Spin:
    """How long one reader's blocking receives busy-poll before they sleep.

    window: seconds (> 0). active: whether the next blocking receive polls,
    that is whether the last one waited less than the window.
    """
    cdef readonly double window
    cdef readonly bint active

    def __cinit__(self, double window):
        if not window > 0:
            raise ValueError(f"a spin window must be > 0 seconds, not {window!r}")
        self.window = window
        self.active = False

    def wait_ready(self, int epfd, double timeout) -> bool:
        """For an event loop's selector: look whether anything is ready on the epoll
        instance epfd, without taking it, and if active poll until something is,
        the window passes, or timeout (seconds; < 0: none). True if something was
        ready at the first look: a wait that teaches nothing (see learn)."""
        cdef epoll_event event
        cdef double end
        cdef int ready
        cdef object me = PyThread_get_thread_ident()
        PySet_Add(_waiting, me)  # the profiler sees no frame of this wait
        try:
            with nogil:
                ready = epoll_wait(epfd, &event, 1, 0)
                if ready == 0 and self.active:
                    end = _now() + (self.window if timeout < 0 or timeout > self.window else timeout)
                    while True:
                        sched_yield()
                        if epoll_wait(epfd, &event, 1, 0) != 0 or _now() >= end:
                            break
        finally:
            PySet_Discard(_waiting, me)
        PyErr_CheckSignals()
        return ready != 0

    def learn(self, double waited) -> None:
        """The last wait took waited seconds: poll before the next one if that was short."""
        self.active = waited < self.window


cdef ssize_t _poll(int fd, msghdr* msg, int flags, double end, bint* at_once) noexcept nogil:
    """Receive without blocking until something comes or the clock passes end
    (at least once): what recvmsg returned, or -2 if nothing came by then.
    at_once: set if the first try received."""
    cdef ssize_t n
    at_once[0] = True
    while True:
        n = recvmsg(fd, msg, flags | MSG_DONTWAIT)
        if n >= 0 or c_errno.errno != c_errno.EAGAIN:
            return n
        at_once[0] = False
        if _now() >= end:
            return -2
        sched_yield()  # a peer on this CPU runs at once


cdef int _raise_unless_interrupted(int error) except -1:
    """After a failed call: raise its OSError, or run signal handlers (EINTR) and
    return 0 to retry, as the socket module does (PEP 475)."""
    if error != c_errno.EINTR:
        c_errno.errno = error  # what PyErr_SetFromErrno reads
        PyErr_SetFromErrno(OSError)
    PyErr_CheckSignals()
    return 0


cdef Py_ssize_t _receive(object sock, object buf, int flags, object decoder, Spin spin) except -1:
    """recvmsg into buf; descriptors that came along go to decoder.add_fds. A
    blocking one busy-polls first if spin says so, and teaches spin how long it waited."""
    cdef Py_buffer view
    cdef iovec iov
    cdef msghdr msg
    cdef size_t control[CONTROL_WORDS]
    cdef ssize_t n
    cdef int fd = sock.fileno(), error = 0
    cdef cmsghdr* cmsg
    cdef int* fds
    cdef Py_ssize_t i, count
    cdef object me = None if flags & MSG_DONTWAIT else PyThread_get_thread_ident()
    cdef bint learn = spin is not None and me is not None
    cdef bint at_once = False
    cdef double start = _now() if learn else 0.0
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    if me is not None:
        PySet_Add(_waiting, me)
    try:
        iov.iov_base = view.buf
        iov.iov_len = view.len
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = &iov
        msg.msg_iovlen = 1
        msg.msg_control = <void*>control if decoder is not None else NULL
        msg.msg_controllen = _control_len if decoder is not None else 0
        msg.msg_flags = 0
        if decoder is not None:
            flags |= MSG_CMSG_CLOEXEC
        n = -2
        if learn:  # an inactive spin tries once, to tell data already there from a wait
            with nogil:
                n = _poll(fd, &msg, flags, start + (spin.window if spin.active else 0.0), &at_once)
                error = c_errno.errno
            if n == -2:
                # A signal that came while polling interrupted no system call:
                # its handler runs now, not once the receive below returns.
                PyErr_CheckSignals()
            elif n < 0:
                _raise_unless_interrupted(error)
                n = -2
        while n < 0:
            with nogil:
                n = recvmsg(fd, &msg, flags)
                error = c_errno.errno
            if n < 0:
                _raise_unless_interrupted(error)
        if learn and not at_once:
            spin.active = _now() - start < spin.window
    finally:
        PyBuffer_Release(&view)
        if me is not None:
            PySet_Discard(_waiting, me)
    if decoder is not None and (msg.msg_controllen or msg.msg_flags & MSG_CTRUNC):
        received = []
        cmsg = CMSG_FIRSTHDR(&msg)
        while cmsg != NULL:
            if cmsg.cmsg_level == SOL_SOCKET and cmsg.cmsg_type == SCM_RIGHTS:
                count = (cmsg.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                fds = <int*>CMSG_DATA(cmsg)
                for i in range(count):
                    received.append(fds[i])
            cmsg = CMSG_NXTHDR(&msg, cmsg)
        decoder.add_fds(received, bool(msg.msg_flags & MSG_CTRUNC))
    return n


def recv_into(sock: object, buf: object, int flags=0, Spin spin=None) -> int:
    """sock.recv_into(buf, 0, flags); busy-polling first as spin says if it blocks."""
    return _receive(sock, buf, flags, None, spin)


def recv_into_with_fds(sock: object, buf: object, decoder: object, int flags=0,
                       Spin spin=None) -> int:
    """recv_into that hands the descriptors that came along to decoder.add_fds
    (fds, truncated), truncated when the kernel dropped some (MSG_CTRUNC)."""
    return _receive(sock, buf, flags, decoder, spin)


def send_buffers(sock: object, buffers: object, fds: object, int flags) -> int:
    """sock.sendmsg(buffers, ancillary, flags), ancillary the descriptors fds
    (a sequence of ints, or None): bytes written."""
    cdef list items = buffers if type(buffers) is list else list(buffers)
    cdef Py_ssize_t count = len(items), i, got = 0, total = 0
    cdef Py_buffer stack_views[IOV_STACK]
    cdef iovec stack_iov[IOV_STACK]
    cdef Py_buffer* views = stack_views
    cdef iovec* iov = stack_iov
    cdef size_t control[CONTROL_WORDS]
    cdef msghdr msg
    cdef cmsghdr* cmsg
    cdef int* slots
    cdef Py_ssize_t nfds = 0 if fds is None else len(fds)
    cdef int fd = sock.fileno(), error = 0
    cdef ssize_t n
    if count > MAX_IOV:
        raise OSError(22, f"sendmsg of {count} buffers (at most {MAX_IOV})")
    if nfds > MAX_FDS:
        raise OSError(22, f"sendmsg of {nfds} descriptors (at most {MAX_FDS})")
    if count > IOV_STACK:
        views = <Py_buffer*>malloc(count * sizeof(Py_buffer))
        iov = <iovec*>malloc(count * sizeof(iovec))
        if views == NULL or iov == NULL:
            free(views)
            free(iov)
            raise MemoryError()
    try:
        for i in range(count):
            PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE)
            got += 1
            iov[i].iov_base = views[i].buf
            iov[i].iov_len = views[i].len
            total += views[i].len
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_iov = iov
        msg.msg_iovlen = count
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        if nfds:
            msg.msg_control = <void*>control
            msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
            cmsg = CMSG_FIRSTHDR(&msg)
            cmsg.cmsg_level = SOL_SOCKET
            cmsg.cmsg_type = SCM_RIGHTS
            cmsg.cmsg_len = CMSG_LEN(nfds * sizeof(int))
            slots = <int*>CMSG_DATA(cmsg)
            for i in range(nfds):
                slots[i] = fds[i]
        while True:
            if total < SEND_NOGIL:
                n = sendmsg(fd, &msg, flags)
                error = c_errno.errno
            else:
                with nogil:
                    n = sendmsg(fd, &msg, flags)
                    error = c_errno.errno
            if n >= 0:
                return n
            _raise_unless_interrupted(error)
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        if views != stack_views:
            free(views)
            free(iov)
