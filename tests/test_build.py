"""The socket calls of the connection core (``_sockio``): they behave as the
socket module's methods do: errors, descriptors, a closed socket, a signal
during a blocking receive.
"""
from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from bigmachine import _sockio


# ---- _sockio ----------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


class FdSink:
    """Stands for the decoder: keeps what add_fds was given."""

    def __init__(self):
        self.calls = []

    def add_fds(self, fds, truncated):
        self.calls.append((fds, truncated))


def test_send_buffers_and_recv_into_move_the_bytes(pair):
    a, b = pair
    assert _sockio.send_buffers(a, [b"head", memoryview(b"er-"), bytearray(b"body")], None, 0) == 11
    buf = bytearray(64)
    assert _sockio.recv_into(b, buf) == 11
    assert bytes(buf[:11]) == b"header-body"
    many = [b"x"] * 100  # more buffers than live on the stack
    assert _sockio.send_buffers(a, many, None, 0) == 100
    assert _sockio.recv_into(b, buf) == 64 and _sockio.recv_into(b, buf) == 36


def test_descriptors_travel_and_arrive_close_on_exec(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        assert _sockio.send_buffers(a, [b"m"], [r, w], 0) == 1
        sink = FdSink()
        assert _sockio.recv_into_with_fds(b, bytearray(8), sink) == 1
        [(fds, truncated)] = sink.calls
        assert len(fds) == 2 and not truncated
        try:
            assert not any(os.get_inheritable(fd) for fd in fds)
            os.write(fds[1], b"through the copy")
            assert os.read(r, 64) == b"through the copy"
        finally:
            for fd in fds:
                os.close(fd)
        # Without descriptors the decoder is not called.
        _sockio.send_buffers(a, [b"n"], None, 0)
        assert _sockio.recv_into_with_fds(b, bytearray(8), sink) == 1 and len(sink.calls) == 1
    finally:
        os.close(r)
        os.close(w)


def test_errors_are_the_socket_modules(pair):
    a, b = pair
    with pytest.raises(BlockingIOError):
        _sockio.recv_into(b, bytearray(8), socket.MSG_DONTWAIT)
    with pytest.raises(BufferError):
        _sockio.recv_into(b, b"read-only bytes")
    with pytest.raises(TypeError):
        _sockio.send_buffers(a, [b"ok", 12], None, 0)
    with pytest.raises(OSError, match="at most"):
        _sockio.send_buffers(a, [b""] * 1025, None, 0)
    a.close()
    assert _sockio.recv_into(b, bytearray(8)) == 0  # the peer closed: end of stream
    with pytest.raises(OSError) as closed:
        _sockio.send_buffers(a, [b"x"], None, 0)
    assert closed.value.errno == 9  # EBADF: a closed socket's number is never used
    b.close()
    with pytest.raises(OSError) as closed:
        _sockio.recv_into(b, bytearray(8))
    assert closed.value.errno == 9


def test_a_signal_during_a_blocking_receive_runs_its_handler_and_the_receive_goes_on(pair):
    a, b = pair
    caught = []
    previous = signal.signal(signal.SIGALRM, lambda *_: caught.append(True))
    sender = threading.Timer(0.3, a.send, args=(b"late",))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        sender.start()
        buf = bytearray(8)
        assert _sockio.recv_into(b, buf) == 4 and bytes(buf[:4]) == b"late"
        assert caught == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sender.cancel()


def test_a_handler_that_raises_ends_the_receive(pair):
    a, b = pair

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            _sockio.recv_into(b, bytearray(8))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
