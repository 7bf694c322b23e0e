"""Shared fixtures: leak checks after every test, and bigmachine sessions.

After each test the autouse ``no_leaks`` fixture checks that the test left no
child process (psutil, recursively), no non-daemon thread, no bigmachine
thread and no listening socket of this process behind, polling
for up to LEAK_GRACE seconds before it fails the test. Processes alive when
the test started (those of module- or session-scoped fixtures, which pytest
sets up first) may outlive it, and while a session registered with
``shared`` is alive, bigmachine threads may too; ``unshare`` shuts such a
session down and checks that its own processes and threads are gone.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import psutil
import pytest

import bigmachine as bm
from tests.ssh_fixtures import bare_venv, cache, sshd, system, venv  # noqa: F401 (shared fixtures)

LEAK_GRACE = 5.0
# Small timings so that failures are noticed fast, but generous enough for
# two loaded cores shared with other test runs.
TIMING = dict(keepalive_period=0.25, lost_after=5.0)

_shared_sessions: list = []


def children() -> set[int]:
    """Live (non-zombie) descendants of this process."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _stray_threads(before: set) -> list:
    """Threads started during the test and still alive: non-daemon ones, and
    bigmachine's own (IO loops, readers, pools, output pumps) unless a shared
    session, which may start such threads at any time, is alive."""
    ours = not _shared_sessions
    return [t for t in threading.enumerate()
            if t.is_alive() and t is not threading.main_thread() and t not in before
            and (not t.daemon or (ours and t.name.startswith("bigmachine-")))]


def listeners() -> set:
    """The addresses this process listens on (in-process machines' listeners)."""
    return {c.laddr for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def wait_no_leaks(allowed_pids: set = frozenset(), before_threads: set = frozenset(),
                  grace: float = LEAK_GRACE, before_listeners: set = None) -> None:
    """Poll until nothing leaked; fail with what is left after grace seconds."""
    deadline = time.monotonic() + grace
    while True:
        procs = children() - set(allowed_pids)
        threads = _stray_threads(set(before_threads))
        sockets = listeners() - before_listeners if before_listeners is not None else set()
        if not procs and not threads and not sockets:
            return
        if time.monotonic() > deadline:
            described = []
            for pid in procs:
                try:
                    described.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())}")
                except psutil.NoSuchProcess:
                    pass
            pytest.fail(f"leaked after the test: child processes {described}, "
                        f"non-daemon threads {[t.name for t in threads]}, "
                        f"listening sockets {sorted(sockets)}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaks():
    allowed_pids = children()  # those of module-scoped sessions set up before the test
    before_threads = set(threading.enumerate())
    before_listeners = listeners()
    yield
    wait_no_leaks(allowed_pids, before_threads, before_listeners=before_listeners)


def shared(b):
    """Register a module-scoped session whose processes and threads outlive tests."""
    _shared_sessions.append(b)
    return b


def session_pids(b) -> set[int]:
    """The processes of b's machines (Local), with their descendants."""
    pids = set()
    for m in b.machines():
        popen = getattr(m.process, "popen", None)
        if popen is None:
            continue
        pids.add(popen.pid)
        try:
            pids.update(c.pid for c in psutil.Process(popen.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


def unshare(b) -> None:
    """Shut a shared session down and check that its processes and threads are gone.

    Other processes alive now (a session-scoped sshd, another module's
    session) are left alone.
    """
    ours = session_pids(b)
    others = children() - ours
    threads_before = {t for t in threading.enumerate() if not t.name.startswith("bigmachine-")}
    _shared_sessions.remove(b)
    b.shutdown()
    wait_no_leaks(allowed_pids=others, before_threads=threads_before)


@pytest.fixture
def cluster():
    """A fresh Local session, shut down after the test."""
    b = bm.start(**TIMING)
    try:
        yield b
    finally:
        b.shutdown()


@pytest.fixture
def unix_pair():
    """Two connected Unix stream sockets, closed after the test."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def profile_while(call, seconds: float, warmup: float = 0.2) -> list:
    """This process's sampled stacks (_profile.sample) while another thread
    makes call() over and over (after warmup seconds of it)."""
    from bigmachine import _profile
    done = threading.Event()

    def calls():
        try:
            while not done.is_set():
                call()
        finally:
            done.set()

    caller = threading.Thread(target=calls)
    caller.start()
    try:
        time.sleep(warmup)
        return _profile.sample(seconds, hz=100)
    finally:
        done.set()
        caller.join(30)


def poll(fn, timeout: float = 5.0, interval: float = 0.02):
    """Call fn until it returns something truthy; return that, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)


class Records(logging.Handler):
    """Keeps every log record it is given, for a test to look through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
