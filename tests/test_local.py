"""bm.Local specifics: child processes, their environment, output and secrets."""
from __future__ import annotations

import base64
import os
import signal
import sys
import threading
import time

import psutil
import pytest

import bigmachine as bm
from bigmachine.backends import local
from tests.conftest import TIMING, children, poll
from tests.obs_services import Work
from tests.services import Echo

pytestmark = pytest.mark.timeout(60)


def test_machines_are_children_with_the_drivers_interpreter_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected_path = [p if p else os.getcwd() for p in sys.path]
    with bm.start(**TIMING) as b:
        m0, m1 = b.start(2, services={"Echo": Echo()})
        for m in (m0, m1):
            env = m.call("Echo.environment", timeout=10)
            assert env["executable"] == sys.executable
            assert os.path.realpath(env["cwd"]) == os.path.realpath(tmp_path)
            assert env["path"] == expected_path
            assert env["pid"] == m.info()["pid"] != os.getpid()
            proc = psutil.Process(env["pid"])
            assert proc.ppid() == os.getpid()
            assert os.path.realpath(proc.exe()) == os.path.realpath(sys.executable)
        assert m0.info()["pid"] != m1.info()["pid"]
        info = m0.info()
        assert info["name"] == m0.name and info["addr"] == m0.addr
        assert "Echo" in info["services"]
        pids = [m0.info()["pid"], m1.info()["pid"]]
        assert set(pids) <= children()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_output_is_copied_with_machine_prefix(capfd):
    with bm.start(**TIMING) as b:
        m0, m1 = b.start(2, services={"Echo": Echo()})
        assert m0.call("Echo.say", out="hello out\nsecond line", err="hello err", timeout=10)
        assert m1.call("Echo.say", out="from m1", timeout=10)
        # output reaches the driver while the machine runs
        seen = []

        def arrived():
            seen.append(capfd.readouterr().err)
            text = "".join(seen)
            return all(s in text for s in ("hello out", "second line", "hello err", "from m1"))

        poll(arrived, timeout=5)
        err = "".join(seen)
        lines = err.splitlines()
        assert f"{m0.name}: hello out" in lines
        assert f"{m0.name}: second line" in lines
        assert f"{m0.name}: hello err" in lines
        assert f"{m1.name}: from m1" in lines
        # and right before shutdown: nothing printed is lost, not even an unterminated line
        assert m0.call("Echo.say", out="last words", err="last err", tail="no newline", timeout=10)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert f"{m0.name}: last words" in lines
    assert f"{m0.name}: last err" in lines
    assert f"{m0.name}: no newline" in lines
    assert "last words" not in out  # the driver's stdout is left alone


def test_secret_is_not_in_cmdline_or_environment(cluster):
    m0, = cluster.start(1, services={"Echo": Echo()})
    pid = m0.info()["pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read()
    creds = cluster.node.creds
    secret = creds.secret
    assert len(secret) >= 16
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(),
             base64.b64encode(secret), base64.urlsafe_b64encode(secret),
             base64.b64encode(secret).rstrip(b"="), creds.encode_for(m0.name),
             creds.owner_token(m0.name)]
    for form in forms:
        assert form not in cmdline
        assert form not in environ
    assert b"bigmachine" in cmdline  # we did read the right process
    # the machine does know it: only a peer with the secret gets in
    assert m0.call("Echo.echo", 1, timeout=10) == 1


def test_shutdown_leaves_no_child_process():
    b = bm.start(**TIMING)
    machines = b.start(3, services={"Echo": Echo()})
    pids = {m.info()["pid"] for m in machines}
    assert len(pids) == 3 and pids <= children()
    t0 = time.monotonic()
    b.shutdown()
    assert time.monotonic() - t0 < 10
    assert not pids & children()
    for m in machines:
        assert m.state == bm.State.STOPPED
        assert isinstance(m.err, bm.MachineLost)
        with pytest.raises(bm.MachineLost):
            m.call("Echo.echo", 1, timeout=5)


@bm.service
class SessionSpawner:
    """Starts a helper the way servers are started: in a session of its own."""

    def spawn(self):
        import subprocess
        return subprocess.Popen(["sleep", "1000"], start_new_session=True).pid


def test_a_helper_in_its_own_session_ends_with_its_machine():
    """A service's child that left the machine's process group (start_new_session)
    is killed as the machine ends: it no longer outlives the session, holding the
    machine's output pipes and with them the driver's output threads."""
    b = bm.start(**TIMING)
    helper = None
    try:
        m, = b.start(1, services={"S": SessionSpawner()})
        helper = m.call("S.spawn", timeout=10)
        b.shutdown()
        poll(lambda: not psutil.pid_exists(helper)
             or psutil.Process(helper).status() == psutil.STATUS_ZOMBIE, timeout=2)
        assert not [t.name for t in threading.enumerate()
                    if t.name in ("bigmachine-out-m0", "bigmachine-err-m0")]
    finally:
        b.shutdown()
        if helper is not None and psutil.pid_exists(helper):
            os.kill(helper, signal.SIGKILL)


def test_keepalives_keep_an_idle_machine_alive():
    # lease 0.8 s: without keepalives (every 0.1 s) the machine would stop itself
    # (lost_after must be shorter than the lease less a keepalive period)
    with bm.start(keepalive_period=0.1, lease=0.8, lost_after=0.6) as b:
        m0, = b.start(1, services={"Echo": Echo()})
        time.sleep(1.6)
        assert m0.state == bm.State.RUNNING
        assert m0.call("Echo.echo", "alive", timeout=10) == "alive"


def test_output_keeps_draining_when_the_drivers_stderr_is_closed(monkeypatch):
    """A machine's output pipe must never fill up because the driver's stderr
    went away (a harness replaced and closed it): the machine would block."""
    import io

    closed = io.StringIO()
    closed.close()
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"Echo": Echo()})
        monkeypatch.setattr(sys, "stderr", closed)
        line = "x" * 1000
        for _ in range(3):  # 3 x 200 KiB: well past a pipe's 64 KiB buffer
            m.call("Echo.say", err="\n".join([line] * 200), timeout=20)
        monkeypatch.undo()
        assert m.call("Echo.echo", 7, timeout=10) == 7


def test_a_session_makes_its_private_socket_directory_as_it_starts():
    # While its template warms up, not on the way to the first machine.
    system = bm.Local(**TIMING)
    with bm.start(system):
        path = system.sockets.path
        st = os.lstat(path)
        assert st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700
    assert not os.path.exists(path)
    tls = bm.Local(tls=True, **TIMING)
    with bm.start(tls):
        assert tls.sockets is None  # its machines listen on loopback TCP


def test_a_machine_slow_to_end_after_sigkill_does_not_fail_its_stop(monkeypatch, caplog):
    """stop() waits a bounded time for a SIGKILLed machine (freeing 2 GiB takes far
    longer than the 1 ms allowed here; a hung filesystem can take forever), then
    says so and goes on, untyped TimeoutExpired no more; the machine is reaped
    once it has ended, and the session shuts down."""
    monkeypatch.setattr(local, "KILL_WAIT", 0.001)
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"Work": Work()})
        assert m.call("Work.hold", 2048, timeout=60) == 2048
        m.process.stop(0)
        assert any("after SIGKILL" in r.getMessage() for r in caplog.records)
        poll(lambda: not m.process.alive(), timeout=20)
        assert m.process.describe_exit() == "killed by SIGKILL"
