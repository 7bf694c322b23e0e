"""Local machines forked from a warm template (issue 13): what a fork must not share.

The template is found as the child of this process whose command line runs
bigmachine.backends._template, that leads its own session and that appeared
with the session.
"""
from __future__ import annotations

import base64
import ctypes
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

import bigmachine as bm
from bigmachine import _blas
from tests.conftest import TIMING, poll
from tests.test_faults import gone

pytestmark = pytest.mark.timeout(90)

TEMPLATE_MARK = b"bigmachine.backends._template"


@bm.service
class Probe:
    """What a machine can tell about its own process."""

    def rngs(self):
        import numpy

        return {"random": random.random(), "numpy": float(numpy.random.random())}

    def fault_draws(self):
        """How many draws this process's fault injector has made since it was seeded
        with seed + this pid (None: its stream is not that one)."""
        from bigmachine import _faults

        own = random.Random(_faults.FAULTS.seed + os.getpid())
        for made in range(10_000):
            if own.getstate() == _faults.FAULTS.rng.getstate():
                return made
            own.random()
        return None

    def process(self):
        import gc

        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read()
        return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgrp(),
                "forked": TEMPLATE_MARK in cmdline, "numpy": "numpy" in sys.modules,
                "frozen": gc.get_freeze_count(), "collecting": gc.isenabled(),
                "numpy.random": "numpy.random" in sys.modules}

    def env(self, name):
        return os.environ.get(name)

    def string_hash(self, text):
        return hash(text)

    def pools(self):
        import numpy  # noqa: F401  loads OpenBLAS in a machine that has not yet

        return sorted(_blas.pools().values())

    def exit_soon(self, code):
        threading.Timer(0.2, os._exit, (code,)).start()
        return True


def templates() -> set[int]:
    """Pids of the templates among this process's children: each leads a session of
    its own (the machines forked from it, which share its command line, do not)."""
    out = set()
    for p in psutil.Process().children():
        try:
            if TEMPLATE_MARK in " ".join(p.cmdline()).encode() and os.getsid(p.pid) == p.pid:
                out.add(p.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return out


@pytest.fixture
def session():
    """A Local session and the pid of the template it started."""
    before = templates()
    b = bm.start(**TIMING)
    try:
        made = poll(lambda: templates() - before, timeout=10)
        assert len(made) == 1
        yield b, made.pop()
    finally:
        b.shutdown()


def fresh(code: str, **env: str) -> str:
    """What a fresh interpreter with the driver's environment (and env) prints for code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = dict(os.environ, PYTHONPATH=root, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, check=True, timeout=60,
                          capture_output=True, text=True).stdout.strip()


def test_machines_are_forked_children_in_their_own_group(session):
    b, template = session
    machines = b.start(1, services={"Probe": Probe()}) + b.start(2, services={"Probe": Probe()})
    for m in machines:
        info = m.call("Probe.process", timeout=10)
        assert info["forked"]
        assert info["ppid"] == os.getpid() != template  # reparented to the driver
        assert info["pgid"] == info["pid"] == m.process.popen.pid
        assert info["numpy"] and info["frozen"] > 0  # imported and frozen in the template
        assert info["collecting"]  # the template warms up with the collector off, not its machines
    # numpy.random is imported by the template once the first request is answered
    assert [m.call("Probe.process")["numpy.random"] for m in machines] == [False, True, True]
    # the driver was a child subreaper only while it asked for forks
    state = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(37, ctypes.byref(state), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    assert state.value == 0


def test_template_imports_numpy_random_after_a_quiet_moment(session):
    # Not while its first machines start (they would share 2 cores with it), but
    # without waiting for another request either.
    b, template = session

    def mapped() -> bool:
        with open(f"/proc/{template}/maps") as f:
            return "mtrand" in f.read()  # numpy.random's extension module

    m, = b.start(1, services={"Probe": Probe()})
    assert poll(mapped, timeout=10)
    assert not m.call("Probe.process", timeout=10)["numpy.random"]  # forked before it
    later, = b.start(1, services={"Probe": Probe()})
    assert later.call("Probe.process", timeout=10)["numpy.random"]


def test_a_session_whose_system_init_fails_leaves_no_template(monkeypatch):
    """Local.init starts the template, then makes the sockets' directory: when that
    fails, bm.start says so (typed) and stops the template it started."""
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-bigmachine-test")
    before = templates()
    with pytest.raises(bm.Error, match="sockets"):
        bm.start(**TIMING)
    assert templates() == before


def test_a_template_whose_socket_is_above_descriptor_1023_serves_on():
    """The template's socket keeps the driver's descriptor number, which can pass 1023
    in a driver with many machines (select() cannot wait on it there)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        before = templates()
        b = bm.start(**TIMING)
        try:
            first = b.start(1, services={"Probe": Probe()})
            made = templates() - before
            time.sleep(0.3)  # past LATER_AFTER: the template waited for its quiet moment
            more = b.start(2, services={"Probe": Probe()})
            assert templates() - before == made and len(made) == 1
            for m in first + more:
                assert m.call("Probe.process", timeout=10)["forked"]
        finally:
            b.shutdown()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_rng_streams_differ_across_forked_machines(session):
    b, _ = session
    machines = b.start(1, services={"Probe": Probe()}) + b.start(3, services={"Probe": Probe()})
    draws = [m.call("Probe.rngs", timeout=20) for m in machines]
    for kind in ("random", "numpy"):
        values = [d[kind] for d in draws]
        assert len(set(values)) == len(values), (kind, values)


def test_fault_injector_streams_differ_across_forked_machines(monkeypatch):
    """The test-only fault injector draws from an RNG too. Forked machines that kept
    their template's stream made the same choices: one early drop then failed
    every machine's start (the fault soak's rare hang)."""
    monkeypatch.setenv("BIGMACHINE_FAULTS", "seed=7")  # no faults: only the stream
    b = bm.start(**TIMING)
    try:
        machines = b.start(1, services={"Probe": Probe()}) + b.start(2, services={"Probe": Probe()})
        assert all(m.call("Probe.process", timeout=20)["forked"] for m in machines)
        draws = [m.call("Probe.fault_draws", timeout=20) for m in machines]
    finally:
        b.shutdown()
    assert None not in draws, draws


@bm.service
class PoolsAtInit:
    """Records the thread pools its machine has when its services' init runs."""

    def init(self, machine):
        import numpy  # noqa: F401  loads OpenBLAS in a machine that has not yet

        self.seen = sorted(_blas.pools().values())

    def pools(self):
        return self.seen


def test_template_is_single_threaded_and_machines_get_their_pools_back(session):
    b, template = session
    machines = b.start(1, services={"Probe": Probe()}) + b.start(2, services={"Probe": Probe()})
    assert len(os.listdir(f"/proc/{template}/task")) == 1
    expected = json.loads(fresh("import json, numpy; from bigmachine import _blas; "
                                "print(json.dumps(sorted(_blas.pools().values())))"))
    assert expected and expected[0] >= 1
    for m in machines:
        assert m.call("Probe.pools", timeout=20) == expected
    # restored as the owner registers the services, before any of them computes
    m, = b.start(1, services={"PoolsAtInit": PoolsAtInit()})
    assert m.call("PoolsAtInit.pools", timeout=20) == expected


def _secret_forms(creds, names) -> list[bytes]:
    secret = creds.secret
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(),
             base64.b64encode(secret).rstrip(b"="), base64.urlsafe_b64encode(secret).rstrip(b"=")]
    for name in names:
        forms += [creds.owner_token(name), creds.encode_for(name)]
    return forms


def test_template_holds_no_secret(session):
    b, template = session
    machines = b.start(1, services={"Probe": Probe()}) + b.start(2, services={"Probe": Probe()})
    forms = _secret_forms(b.node.creds, [m.name for m in machines])
    for what in ("cmdline", "environ"):
        with open(f"/proc/{template}/{what}", "rb") as f:
            data = f.read()
        assert not [form for form in forms if form in data], what
    scanned = 0
    with open(f"/proc/{template}/maps") as maps, open(f"/proc/{template}/mem", "rb", 0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (r)", line)
            if not m or "[vvar]" in line or "[vsyscall]" in line:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            scanned += len(data)
            assert not [form for form in forms if form in data], line
    assert scanned > 1 << 20  # we did read its heap
    # while the machines, which must know it, do
    assert machines[0].call("Probe.env", "PATH", timeout=10) == os.environ.get("PATH")


def test_a_killed_template_leaves_machines_running_and_the_next_start_makes_another(session):
    b, template = session
    machines = b.start(2, services={"Probe": Probe()})
    os.kill(template, signal.SIGKILL)
    # Dead, not only dying: a dying process's command line already reads empty, but
    # the driver cannot reap it yet, so a start then still asks it, falls back to
    # fresh interpreters (as it should) and makes the new template a start later.
    poll(lambda: gone(template), timeout=10)
    for m in machines:
        assert m.call("Probe.env", "PATH", timeout=10) == os.environ.get("PATH")
        assert m.state == bm.State.RUNNING
    more = b.start(2, services={"Probe": Probe()})
    again = templates()
    assert len(again) == 1 and template not in again
    for m in machines + more:
        assert m.call("Probe.process", timeout=10)["forked"]


def test_a_hung_template_is_given_up_while_fresh_interpreters_can_still_start():
    """A template that does not answer (SIGSTOPped here) is dropped after a bounded
    wait, not the whole start timeout: the machines then start fresh, in time."""
    before = templates()
    with bm.start(start_timeout=10, **TIMING) as b:
        b.start(1, services={"Probe": Probe()})  # the template is up and has forked
        template, = templates() - before
        os.kill(template, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            m, = b.start(1, services={"Probe": Probe()})
            took = time.monotonic() - t0
            assert not m.call("Probe.process", timeout=10)["forked"]
            assert took < 10, f"the start took {took:.1f} s"
            poll(lambda: gone(template), timeout=10)  # dropped: the next start makes another
        finally:
            try:
                os.kill(template, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("name,value", [("PYTHONHASHSEED", "0"), ("OMP_NUM_THREADS", "1"),
                                        ("BIGMACHINE_COUNTERS", "0")])
def test_env_read_at_startup_spawns_a_fresh_interpreter(session, name, value):
    b, _ = session
    m, = b.start(1, services={"Probe": Probe()}, env={name: value})
    info = m.call("Probe.process", timeout=10)
    assert not info["forked"] and info["ppid"] == os.getpid() and info["pgid"] == info["pid"]
    assert m.call("Probe.env", name, timeout=10) == value
    if name == "PYTHONHASHSEED":
        assert m.call("Probe.string_hash", "bigmachine", timeout=10) == int(
            fresh("print(hash('bigmachine'))", PYTHONHASHSEED="0"))
    elif name == "OMP_NUM_THREADS":
        assert m.call("Probe.pools", timeout=20) == [1]
    # an ordinary variable is no reason to start afresh
    m2, = b.start(1, services={"Probe": Probe()}, env={"BM_TEMPLATE_TEST": "x y"})
    assert m2.call("Probe.process", timeout=10)["forked"]
    assert m2.call("Probe.env", "BM_TEMPLATE_TEST", timeout=10) == "x y"


@pytest.mark.parametrize("how,expected", [
    ("exit", "exit status 7"), ("SIGKILL", "killed by SIGKILL"), ("SIGTERM", "killed by SIGTERM")])
def test_how_a_forked_machine_ended_is_reported(session, how, expected):
    b, _ = session
    m, = b.start(1, services={"Probe": Probe()})
    assert m.call("Probe.process", timeout=10)["forked"]
    if how == "exit":
        assert m.call("Probe.exit_soon", 7, timeout=10)
    else:
        os.kill(m.process.popen.pid, getattr(signal, how))
    poll(lambda: m.state == bm.State.STOPPED, timeout=15)
    assert expected in str(m.err), m.err
    assert m.process.describe_exit() == expected


DRIVER = """
import json, os, sys, time
import bigmachine as bm
from tests.test_template import Probe
b = bm.start()
m, = b.start(1, services={"Probe": Probe()})
print(json.dumps({"machine": m.process.local_pid()}), flush=True)
time.sleep(1000)
"""


def test_the_template_and_its_machines_exit_when_the_driver_is_killed(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=root))
    try:
        machine = json.loads(driver.stdout.readline())["machine"]
        kids = psutil.Process(driver.pid).children()
        template, = [p.pid for p in kids if os.getsid(p.pid) == p.pid and p.pid != machine]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        poll(lambda: all(gone(p) for p in (template, machine)), timeout=5)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        driver.stdout.close()
