"""Machines that come and go (issue 14): elastic starts, stopping one machine, env,
crashes on demand, watched dialled handles, output nobody reads, many machines.

Re-dialling a broken owner link is shown with the fault proxy in test_faults.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

import bigmachine as bm
from bigmachine.backends import local as local_backend
from tests.conftest import TIMING, children, poll
from tests.services import CustomError, Echo, SlowInit

pytestmark = pytest.mark.timeout(120)


@bm.service
class Picky:
    """Its init fails on the machine named bad."""

    def __init__(self, bad: str):
        self.bad = bad

    def init(self, machine):
        if machine.name == self.bad:
            raise CustomError(f"{machine.name} refuses to start")

    def env(self, name):
        return os.environ.get(name)

    def name(self):
        return bm.current().machine.name


def test_wait_false_returns_starting_handles_and_calls_wait_for_running():
    with bm.start(**TIMING) as b:
        t0 = time.monotonic()
        machines = b.start(2, services={"Echo": Echo()}, wait=False)
        assert time.monotonic() - t0 < 0.5
        assert all(m.state == bm.State.STARTING for m in machines)
        assert [m.name for m in machines] == ["m0", "m1"]
        assert machines[0].call("Echo.echo", "first", timeout=30) == "first"  # waits for it
        assert machines[1].wait(bm.State.RUNNING, timeout=30) == bm.State.RUNNING
        assert set(b.machines()) == set(machines)


def test_a_failed_start_without_waiting_fails_the_calls_with_its_cause():
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"P": Picky("m0")}, wait=False)
        with pytest.raises(bm.MachineLost) as info:
            m.call("P.name", timeout=30)
        assert m.state == bm.State.STOPPED and isinstance(m.err, CustomError)
        assert "refuses to start" in str(info.value)
        assert b.machines() == []


@pytest.mark.parametrize("how", ["call", "acall"])
def test_a_calls_timeout_bounds_its_wait_for_a_starting_machine_too(how):
    """timeout is one deadline for the whole call: waiting for RUNNING (2 s of
    init here) comes out of it, not on top of it (which took 5 s)."""
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"S": SlowInit(2.0)}, wait=False)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            if how == "call":
                m.call("S.sleep", 10, timeout=3.0)
            else:
                asyncio.run(m.acall("S.sleep", 10, timeout=3.0))
        took = time.monotonic() - t0
        assert m.state == bm.State.RUNNING  # it came up within the timeout
        assert took < 4.0, f"timeout=3 s, but the call took {took:.2f} s"


def test_an_init_longer_than_the_boot_timeout_is_not_cut_short(monkeypatch):
    """The boot timeout bounds the wait for an owner to register, not the services'
    init (which start_timeout bounds): scaled down, a 1 s boot timeout and an init
    of 2.5 s within a start timeout of 30 s."""
    from bigmachine import _supervisor
    monkeypatch.setattr(_supervisor, "BOOT_TIMEOUT", 1.0)
    with bm.start(bm.InProcess(), start_timeout=30, **TIMING) as b:
        m, = b.start(1, services={"S": SlowInit(2.5)})
        assert m.call("S.ready", timeout=10) == "ready"


def _start_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "bigmachine-start" and t.is_alive()]


def test_shutdown_racing_a_start_without_waiting_leaves_nothing_behind(tmp_path, monkeypatch):
    """b.start(wait=False), then b.shutdown() while the start is still forking.

    Driver.shutdown stops the STARTING machines and shuts the system down, but
    nothing stops the bring-up thread, still in system.launch: after shutdown
    has returned, Local starts a new template (_template_for: the old one was
    closed), makes a new socket directory (_listen_addr: sockets is None) and
    starts machines, which the session's end never sees. (The fork is slowed
    here so that shutdown lands in it every time; on a loaded host it does
    without help.)
    """
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    forking = threading.Event()
    real_start = local_backend.Local._start

    def slow_start(self, env, n):
        forking.set()
        time.sleep(0.5)  # a slow fork: shutdown happens meanwhile
        return real_start(self, env, n)

    monkeypatch.setattr(local_backend.Local, "_start", slow_start)
    before = children()  # the session's own (an sshd fixture's, say) are not this test's
    b = bm.start(**TIMING)
    b.start(2, services={"Echo": Echo()}, wait=False)
    assert forking.wait(10)
    b.shutdown()
    # The start that shutdown cut short ends soon (shutdown is bounded), and leaves no
    # process (template or machine) and no socket directory behind.
    poll(lambda: not _start_threads(), timeout=20)
    time.sleep(0.5)
    procs = _describe_and_kill(children() - before)
    left = [d for d in os.listdir(tmp_path) if d.startswith("bigmachine-")]
    assert not procs and not left, \
        f"after shutdown: processes {procs}, socket directories {left}"


def _describe_and_kill(pids) -> list:
    """The command lines of pids, which are then killed (a failing test leaves none)."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.append(" ".join(proc.cmdline())[:100])
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return out


class GatedLocal(bm.Local):
    """Local whose launches wait for a gate: a launch still under way when the
    session shuts down (as a slow SSH host or an EC2 boot would be)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.gate = threading.Event()

    def launch(self, *args, **kwargs):
        self.gate.wait(30)
        return super().launch(*args, **kwargs)


def test_shutdown_during_a_background_start_starts_nothing_afterwards():
    # docs/machines.md: "Leaving the with block, b.shutdown() or the end of the
    # program stops all of them"; wait=False machines "come up in the background".
    # Once b.shutdown() has returned, the batch it stopped must not be launched
    # anyway (here: fresh interpreters after the session ended, and a new socket
    # directory that nobody removes).
    system = GatedLocal(**TIMING)
    b = bm.start(system)
    machines = b.start(2, services={"Echo": Echo()}, wait=False)
    b.shutdown()
    assert [m.state for m in machines] == [bm.State.STOPPED] * 2
    after_shutdown = children()
    system.gate.set()
    try:
        started_later = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            started_later |= children() - after_shutdown
            time.sleep(0.02)
        leftover = system.sockets.path if system.sockets is not None else None
        assert started_later == set() and leftover is None, (started_later, leftover)
    finally:
        # What the late launch left (a template process, a socket directory): end it
        # here, so that the failure above is the only one this test reports.
        machines[0].wait(bm.State.STOPPED, timeout=30)
        system.shutdown()


def test_min_machines_keeps_what_came_up():
    with bm.start(**TIMING) as b:
        before = children()
        machines = b.start(4, services={"P": Picky("m2")}, min_machines=3, timeout=60)
        assert [m.name for m in machines] == ["m0", "m1", "m3"]
        assert all(m.state == bm.State.RUNNING for m in machines)
        assert sorted(m.name for m in b.machines()) == ["m0", "m1", "m3"]
        assert [m.call("P.name", timeout=10) for m in machines] == ["m0", "m1", "m3"]
        # the one that failed is stopped, its process gone
        poll(lambda: len(children() - before) == 3, timeout=10)
        # fewer than asked for: an Error caused by the first failure, nothing left running
        with pytest.raises(bm.Error, match="only 3 of 4 machines came up") as info:
            b.start(4, services={"P": Picky("m6")}, min_machines=4, timeout=60)
        assert isinstance(info.value.__cause__, CustomError)
        assert len(b.machines()) == 3
        poll(lambda: len(children() - before) == 3, timeout=10)


def test_env_reaches_local_machines_and_inprocess_refuses_it():
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"P": Picky("none")}, env={"BM_TEST_VALUE": "a b;c"})
        assert m.call("P.env", "BM_TEST_VALUE", timeout=10) == "a b;c"
    with bm.start(bm.InProcess(), **TIMING) as b:
        with pytest.raises(bm.Error, match="env"):
            b.start(1, services={"P": Picky("none")}, env={"X": "1"})
    with bm.start(bm.InProcess(), **TIMING) as b:
        with pytest.raises(bm.Error, match="env"):
            b.start(1, services={"P": Picky("none")}, env={"X": 1})


def test_shutdown_one_machine_with_calls_in_flight():
    with bm.start(**TIMING) as b:
        m0, m1 = b.start(2, services={"Echo": Echo()})
        pid = m0.info(timeout=10)["pid"]
        box: list = []
        t = threading.Thread(target=lambda: box.append(_outcome(m0, "Echo.sleep", 30)))
        t.start()
        poll(lambda: m0.stats(timeout=5)["open_calls"] >= 1)
        t0 = time.monotonic()
        m0.shutdown()
        assert time.monotonic() - t0 < 5
        t.join(10)
        assert isinstance(box[0], bm.MachineLost), box
        assert m0.state == bm.State.STOPPED and not psutil.pid_exists(pid) or \
            psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert b.machines() == [m1]
        m0.shutdown()  # idempotent
        with pytest.raises(bm.MachineLost):
            m0.call("Echo.echo", 1, timeout=5)
        assert m1.call("Echo.echo", 1, timeout=10) == 1


def test_inprocess_kill_makes_a_machine_vanish_as_a_crash_would():
    with bm.start(bm.InProcess(), **TIMING) as b:
        m0, m1 = b.start(2, services={"Echo": Echo()})
        box: list = []
        t = threading.Thread(target=lambda: box.append(_outcome(m0, "Echo.sleep", 1.0)))
        t.start()
        time.sleep(0.2)
        b.system.kill(m0)  # (its thread runs on to the end of the sleep: threads cannot be killed)
        t.join(5)
        assert isinstance(box[0], bm.MachineLost), box
        assert m0.wait(bm.State.STOPPED, timeout=5) == bm.State.STOPPED
        assert "killed" in str(m0.err), m0.err
        assert m1.call("Echo.echo", 2, timeout=10) == 2
        with pytest.raises(bm.Error):
            b.system.kill(b.dial(m1.addr))  # not a process of ours


def test_a_dialled_machine_that_hangs_fails_its_calls_within_lost_after():
    lost_after = 1.5
    with bm.start(keepalive_period=0.25, lost_after=lost_after, lease=3) as b:
        m, = b.start(1, services={"Echo": Echo()})
        d = b.dial(m.addr)
        assert d.call("Echo.echo", 1, timeout=10) == 1
        pid = m.process.popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            # kill() returns before the kernel has stopped every thread of the target
            poll(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=5)
            t0 = time.monotonic()
            with pytest.raises(bm.MachineLost, match="no reply to pings"):
                d.call("Echo.echo", 2)  # no timeout: the watch ends it
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert took <= lost_after + 1.0, took


DRIVER = textwrap.dedent("""
    import sys, time
    import bigmachine as bm
    from tests.services import Echo

    with bm.start() as b:
        m, = b.start(1, services={"Echo": Echo()})
        t0 = time.monotonic()
        for _ in range(4):
            m.call("Echo.say", out=("y" * 1000 + "\\n") * 500, timeout=30)
        print(f"printed in {time.monotonic() - t0:.2f} s", flush=True)
        sys.stdout.close()
        time.sleep(1.0)
""")


def test_a_machine_never_blocks_on_a_driver_stderr_nobody_reads(tmp_path):
    """2,000 lines of 1 KB from a machine while the driver's stderr is a full pipe."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=root, env=dict(os.environ, PYTHONPATH=root))
    try:
        line = _readline(proc.stdout, timeout=60)  # stderr is not read meanwhile
        assert line.startswith(b"printed in"), line
        err = proc.communicate(timeout=30)[1].decode()
    finally:
        proc.kill()
        proc.wait(10)
    assert "m0: [" in err and "lines of output were dropped" in err, err[-500:]
    assert "m0: yyyy" in err


def _readline(pipe, timeout: float) -> bytes:
    box: list = []
    t = threading.Thread(target=lambda: box.append(pipe.readline()), daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no line within {timeout} s: the driver is blocked"
    return box[0]


def _outcome(m, method, *args, timeout=60):
    try:
        return m.call(method, *args, timeout=timeout)
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("system,n", [(bm.InProcess, 256), (bm.Local, 64)])
def test_many_machines_start_answer_a_fan_out_and_shut_down(system, n):
    """The driver holds many machines: start, a call to each, idle CPU, shutdown."""
    me = psutil.Process()
    fds0, rss0 = me.num_fds(), me.memory_info().rss
    t0 = time.monotonic()
    b = bm.start(system(), keepalive_period=1.0, lost_after=5.0)
    try:
        machines = b.start(n, services={"Echo": Echo()}, timeout=100)
        started = time.monotonic() - t0
        t1 = time.monotonic()
        answers = [m.call("Echo.echo", m.name, timeout=60) for m in machines]
        fan_out = time.monotonic() - t1
        assert answers == [m.name for m in machines]
        time.sleep(1.0)
        cpu0, w0 = sum(me.cpu_times()[:2]), time.monotonic()
        time.sleep(3.0)
        idle = (sum(me.cpu_times()[:2]) - cpu0) / (time.monotonic() - w0)
        fds, rss = me.num_fds() - fds0, me.memory_info().rss - rss0
        assert all(m.state == bm.State.RUNNING for m in machines)
    finally:
        t2 = time.monotonic()
        b.shutdown()
    stopped = time.monotonic() - t2
    print(f"\n{system.__name__} x{n}: started in {started:.2f} s, one call each in "
          f"{fan_out * 1e3:.0f} ms, driver idle CPU {idle * 100:.1f}% of a core, "
          f"{fds / n:.1f} fds and {rss / n / 1024:.0f} KiB RSS per machine, "
          f"shut down in {stopped:.2f} s")
    assert idle < 0.02, f"driver idle CPU {idle * 100:.1f}% of a core with {n} machines"
    assert stopped < 30


def test_inprocess_machines_need_no_keepalives():
    """They live in the driver's process: no lease runs out, whatever the timings."""
    with bm.start(bm.InProcess(), keepalive_period=0.1, lost_after=0.3, lease=0.5) as b:
        m, = b.start(1, services={"Echo": Echo()})
        conn = m.connection()
        sent = conn.last_recv
        time.sleep(1.5)
        assert m.state == bm.State.RUNNING and conn.last_recv == sent  # nothing came or went
        assert m.call("Echo.echo", 1, timeout=5) == 1


@pytest.mark.parametrize("system", [bm.Local, bm.InProcess])
def test_one_system_serves_one_session_after_another(system):
    """Each session makes its own socket directory (the last one removed its own)."""
    shared_system = system()
    addrs = []
    for i in range(2):
        with bm.start(shared_system, **TIMING) as b:
            m, = b.start(1, services={"Echo": Echo()})
            assert m.call("Echo.echo", i, timeout=10) == i
            addrs.append(m.addr)
    assert os.path.dirname(addrs[0]) != os.path.dirname(addrs[1])
    assert not os.path.exists(os.path.dirname(addrs[1][5:]))
