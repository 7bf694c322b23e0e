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

import bigmachine as bm
from bigmachine import _profile, _sockio
from bigmachine._polling import PollingSelector, new_event_loop
from tests.conftest import profile_while
from tests.services import Echo


def _voluntary_switches() -> int:
    """Times the calling thread has slept (blocked) so far."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _send_later(sock, seconds: float) -> subprocess.Popen:
    """Another process sends b"late" on sock after seconds (no thread of ours to
    take the GIL back from the receiver)."""
    code = f"import os, time; time.sleep({seconds}); os.write({sock.fileno()}, b'late')"
    return subprocess.Popen([sys.executable, "-c", code], pass_fds=[sock.fileno()])


def _prime(a, b, spin):
    """A receive on b that waits a little (less than spin's window): the next polls."""
    sender = threading.Timer(0.01, a.send, args=(b"p",))
    sender.start()
    try:
        assert _sockio.recv_into(b, bytearray(8), 0, spin) == 1
    finally:
        sender.join(10)
    assert spin.active


def test_a_spin_window_must_be_a_positive_number_of_seconds():
    for window in (0, -1e-4, float("nan")):
        with pytest.raises(ValueError, match="spin window"):
            _sockio.Spin(window)


def test_a_spinning_receive_polls_only_after_a_short_wait(unix_pair):
    a, b = unix_pair
    spin = _sockio.Spin(0.2)
    buf = bytearray(8)
    assert not spin.active  # nothing learnt yet: the first receive sleeps at once
    a.send(b"now")
    assert _sockio.recv_into(b, buf, 0, spin) == 3
    assert not spin.active  # data already there teaches nothing (a burst's first read)
    _prime(a, b, spin)  # it waited less than the window: the next one polls
    a.send(b"now")
    assert _sockio.recv_into(b, buf, 0, spin) == 3
    assert spin.active  # data already there teaches nothing, either way
    sender = _send_later(a, 0.6)
    try:
        assert _sockio.recv_into(b, buf, 0, spin) == 4 and bytes(buf[:4]) == b"late"
    finally:
        sender.wait(10)
    assert not spin.active  # polled in vain, then slept: the next one sleeps at once
    _prime(a, b, spin)
    a.send(b"x")
    assert _sockio.recv_into(b, buf, socket.MSG_DONTWAIT, spin) == 1
    with pytest.raises(BlockingIOError):
        _sockio.recv_into(b, buf, socket.MSG_DONTWAIT, spin)
    assert spin.active  # a receive that does not block teaches nothing


def test_a_spinning_receive_takes_what_comes_within_its_window_without_sleeping(unix_pair):
    a, b = unix_pair
    buf = bytearray(8)
    spin = _sockio.Spin(1.0)
    _prime(a, b, spin)
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


def test_a_signal_while_polling_runs_its_handler_before_the_receive_sleeps(unix_pair):
    a, b = unix_pair
    spin = _sockio.Spin(0.3)
    _prime(a, b, spin)

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


def test_a_spinning_receive_sees_the_peer_close_and_a_closed_socket(unix_pair):
    a, b = unix_pair
    spin = _sockio.Spin(0.5)
    _prime(a, b, spin)
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
        assert not spin.wait_ready(selector.fileno(), -1)  # inactive: one look, at once
        assert time.monotonic() - t < 0.1
        spin.learn(0.001)
        assert spin.active
        t = time.monotonic()
        assert not spin.wait_ready(selector.fileno(), -1)  # nothing ready: the window
        assert 0.2 <= time.monotonic() - t < 5
        t = time.monotonic()
        assert not spin.wait_ready(selector.fileno(), 0.05)  # a shorter timeout: that
        assert 0.05 <= time.monotonic() - t < 0.19
        selector.register(r, 1)
        os.write(w, b"x")
        t = time.monotonic()
        assert spin.wait_ready(selector.fileno(), -1)  # ready at the first look
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

        loop.call_later(0.01, os.write, w, b"x")
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


# ---- the profiler, and timers ----------------------------------------------------------


def _polling_samples(stacks) -> int:
    return sum(count for stack, count in stacks if "(_polling.py:" in stack[-1])


def test_a_polling_event_loop_is_not_profiled_as_work():
    """A loop waiting in select is left out of profiles (_profile.IDLE), and a
    reader busy-polling its socket is too (_profile.WAITING); a loop busy-polling
    in PollingSelector.select must be as well. Its window is stretched here so
    the poll lasts long enough for the sampler to see it."""
    loop = new_event_loop(0.5)
    r, w = os.pipe()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        got = threading.Event()
        loop.call_soon_threadsafe(loop.add_reader, r, lambda: (os.read(r, 8), got.set()))
        time.sleep(0.05)
        os.write(w, b"x")  # a wait shorter than the window: the next select polls
        assert got.wait(10)
        stacks = _profile.sample(0.3, hz=100)  # while the loop polls, nothing coming
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        os.close(r)
        os.close(w)
    assert _polling_samples(stacks) == 0, sorted(stacks, key=lambda s: -s[1])[:3]


def test_a_machines_loop_serving_async_calls_is_not_profiled_as_work():
    """The same at the default window: a machine's loop serving async calls
    back to back, profiled. Without busy_poll (=0) no sample lands in its select."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        stacks = profile_while(lambda: m.call("Echo.aecho", 1, timeout=30), 1.5, warmup=0.3)
    assert _polling_samples(stacks) <= 2, sorted(stacks, key=lambda s: -s[1])[:3]


def test_a_polling_loop_keeps_its_timers_due_within_the_window():
    """select(timeout) must return by timeout: PollingSelector polls for its whole
    window first, whatever the timeout, so a timer due sooner fires a window late
    (then epoll sleeps ceil(timeout) more). Stretched window; at the maximum of
    1 ms a 0.2 ms sleep takes about 2 ms instead of 1."""
    loop = new_event_loop(0.5)
    r, w = os.pipe()
    try:
        async def main():
            got = loop.create_future()
            loop.add_reader(r, lambda: got.done() or got.set_result(os.read(r, 8)))
            loop.call_later(0.01, os.write, w, b"x")
            await got  # a short wait: the next select polls
            loop.remove_reader(r)
            t = time.monotonic()
            await asyncio.sleep(0.02)
            return time.monotonic() - t

        slept = loop.run_until_complete(main())
    finally:
        loop.close()
        os.close(r)
        os.close(w)
    assert slept < 0.25, slept
