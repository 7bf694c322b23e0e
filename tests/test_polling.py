"""Busy-polling before sleeping: a connection's receives (_sockio.Spin) and the
node's event loop (_polling), which poll only while their waits are short."""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from bigmachine import _sockio
from bigmachine._polling import PollingSelector, new_event_loop


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _voluntary_switches() -> int:
    """Times the calling thread has slept (blocked) so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _send_later(sock, seconds: float) -> subprocess.Popen:
    """Another process sends b"late" on sock after seconds (no thread of ours to
    take the GIL back from the receiver)."""
    code = f"import os, time; time.sleep({seconds}); os.write({sock.fileno()}, b'late')"
    return subprocess.Popen([sys.executable, "-c", code], pass_fds=[sock.fileno()])


def test_a_spin_window_must_be_a_positive_number_of_seconds():
    for window in (0, -1e-4, float("nan")):
        with pytest.raises(ValueError, match="spin window"):
            _sockio.Spin(window)


def test_a_spinning_receive_polls_only_after_a_short_wait(pair):
    a, b = pair
    spin = _sockio.Spin(0.05)
    buf = bytearray(8)
    assert not spin.active  # nothing learnt yet: the first receive sleeps at once
    a.send(b"now")
    assert _sockio.recv_into(b, buf, 0, spin) == 3
    assert spin.active  # it waited less than the window: the next one polls
    sender = _send_later(a, 0.3)
    try:
        assert _sockio.recv_into(b, buf, 0, spin) == 4 and bytes(buf[:4]) == b"late"
    finally:
        sender.wait(10)
    assert not spin.active  # polled in vain, then slept: the next one sleeps at once
    a.send(b"x")
    assert _sockio.recv_into(b, buf, socket.MSG_DONTWAIT, spin) == 1
    assert not spin.active  # a receive that does not block teaches nothing


def test_a_spinning_receive_takes_what_comes_within_its_window_without_sleeping(pair):
    a, b = pair
    buf = bytearray(8)
    spin = _sockio.Spin(1.0)
    a.send(b"now")
    _sockio.recv_into(b, buf, 0, spin)
    results = {}
    for how, polls in (("sleeps", None), ("polls", spin)):
        sender = _send_later(a, 0.2)
        try:
            before = _voluntary_switches()
            assert _sockio.recv_into(b, buf, 0, polls) == 4
            results[how] = _voluntary_switches() - before
        finally:
            sender.wait(10)
    assert results["sleeps"] >= 1 and results["polls"] == 0, results
    assert spin.active


def test_a_signal_while_polling_runs_its_handler_before_the_receive_sleeps(pair):
    a, b = pair
    spin = _sockio.Spin(0.3)
    a.send(b"now")
    _sockio.recv_into(b, bytearray(8), 0, spin)

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # while it polls; nothing ever comes
        with pytest.raises(KeyboardInterrupt):
            _sockio.recv_into(b, bytearray(8), 0, spin)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_spinning_receive_sees_the_peer_close_and_a_closed_socket(pair):
    a, b = pair
    spin = _sockio.Spin(0.5)
    a.send(b"now")
    _sockio.recv_into(b, bytearray(8), 0, spin)
    threading.Timer(0.05, a.close).start()
    assert _sockio.recv_into(b, bytearray(8), 0, spin) == 0  # end of stream, while polling
    b.close()
    with pytest.raises(OSError) as closed:
        _sockio.recv_into_with_fds(b, bytearray(8), None, 0, spin)
    assert closed.value.errno == 9


# ---- the node's event loop ---------------------------------------------------------


def test_wait_ready_polls_only_when_active_and_leaves_what_is_ready():
    spin = _sockio.Spin(0.2)
    selector = PollingSelector(0.2)
    r, w = os.pipe()
    try:
        t = time.monotonic()
        spin.wait_ready(selector.fileno())  # inactive: returns at once
        assert time.monotonic() - t < 0.1
        spin.learn(0.001)
        assert spin.active
        t = time.monotonic()
        spin.wait_ready(selector.fileno())  # nothing registered, nothing ready: the window
        assert 0.2 <= time.monotonic() - t < 5
        selector.register(r, 1)
        os.write(w, b"x")
        t = time.monotonic()
        spin.wait_ready(selector.fileno())
        assert time.monotonic() - t < 0.1
        assert [key.fd for key, _ in selector.select(0)] == [r]  # still there for select
        spin.learn(0.2)
        assert not spin.active
    finally:
        selector.close()
        os.close(r)
        os.close(w)


def test_the_polling_loop_takes_what_comes_within_its_window_without_sleeping():
    loop = new_event_loop(2.0)
    r, w = os.pipe()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)

        async def readable():
            fut = loop.create_future()
            loop.add_reader(r, lambda: fut.done() or fut.set_result(os.read(r, 8)))
            try:
                return await fut
            finally:
                loop.remove_reader(r)

        def slept_until_written(after):
            """Another process writes after seconds; how often this thread slept till then."""
            code = f"import os, time; time.sleep({after}); os.write({w}, b'x')"
            writer = subprocess.Popen([sys.executable, "-c", code], pass_fds=[w])
            try:
                before = _voluntary_switches()
                assert loop.run_until_complete(readable()) == b"x"
                return _voluntary_switches() - before
            finally:
                writer.wait(10)

        os.write(w, b"x")
        loop.run_until_complete(readable())  # a short wait: the next select polls
        assert slept_until_written(0.2) == 0
        assert slept_until_written(2.5) >= 1  # longer than the window: polled, then slept
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_the_polling_loop_keeps_time_and_idles_asleep():
    loop = new_event_loop(0.05)
    try:
        async def pause(seconds):
            t = time.monotonic()
            await asyncio.sleep(seconds)
            return time.monotonic() - t

        for seconds in (0, 0.01, 0.3):  # timers shorter and longer than the window
            assert seconds <= loop.run_until_complete(pause(seconds)) < seconds + 1
        cpu = time.process_time()
        loop.run_until_complete(pause(1.0))  # an idle loop: one poll in vain, then asleep
        assert time.process_time() - cpu < 0.2
    finally:
        loop.close()


def test_busy_poll_zero_makes_a_plain_loop():
    loop = new_event_loop(0)
    try:
        assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"
    finally:
        loop.close()
