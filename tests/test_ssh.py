"""bm.SSH against a real OpenSSH sshd on a loopback port (tests/sshd.py).

The "remote" Python is a plain venv with only numpy and cloudpickle: the
bigmachine package and the tests' own modules reach it only through the
bundles that SSH ships. The sshd, its keys and the venvs are made once per
session; every test that starts machines uses a cache dir of the session
(or its own, when it counts uploads).
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import bigmachine as bm
from bigmachine.backends.ssh.hosts import parse_host as _parse_host
from tests.conftest import poll
from tests.ssh_services import Remote
from tests import sshd as sshd_fixture

pytestmark = pytest.mark.timeout(90)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def bounded(seconds: float):
    """Assert that the block ran within seconds."""

    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()
            return self

        def __exit__(self, *exc):
            self.elapsed = time.monotonic() - self.start
            if exc[0] is None or issubclass(exc[0], Exception):
                assert self.elapsed < seconds, f"took {self.elapsed:.1f} s, more than {seconds} s"

    return _Timer()


# ---- working machines ----------------------------------------------------------------


def test_calls_streams_and_arrays_on_a_venv_that_has_only_numpy_and_cloudpickle(
        system, sshd, venv, cache):
    with bm.start(system(machines_per_host=2)) as b:
        m0, m1 = b.start(2, services={"Remote": Remote()}, timeout=60)
        assert m0.addr.startswith("127.0.0.1:") and m0.addr != m1.addr
        where = m0.call("Remote.where", timeout=10)
        # the machine runs the venv's python, and bigmachine comes from the shipped bundle
        assert where["prefix"] == str(Path(venv).parent.parent)
        bundles = str(cache / "bundles") + "/"
        assert where["bigmachine"].startswith(bundles)
        for ext in ("wire", "decoder"):
            assert where[ext].startswith(bundles) and where[ext].endswith(".so")
        assert where["cwd"].startswith(str(cache / "run") + "/")
        assert where["tmpdir"] == where["cwd"] + "/tmp"
        assert where["pid"] != os.getpid()
        # the secret is in neither argv nor the environment
        secret = b.node.creds.secret
        assert secret not in b"".join(where["argv"]) and secret not in where["environ"]
        assert secret.hex().encode() not in where["environ"]

        assert m0.call("Remote.echo", "hi", timeout=10) == "hi"
        assert asyncio.run(m1.acall("Remote.aecho", 41, timeout=10)) == 41
        assert list(m0.stream("Remote.count", 5, timeout=10)) == [0, 1, 2, 3, 4]

        async def astream():
            return [x async for x in m1.astream("Remote.acount", 4, timeout=10)]

        assert asyncio.run(astream()) == [0, 1, 2, 3]
        a = np.arange(2_000_000, dtype=np.float64)
        back = m0.call("Remote.echo", a, timeout=30)
        assert back.dtype == a.dtype and np.array_equal(back, a)
        assert m1.call("Remote.total", a, timeout=30) == float(a.sum())
        assert np.array_equal(m1.call("Remote.scale", a[:10], 3, timeout=10), a[:10] * 3)
        with pytest.raises(ValueError, match="remote boom"):
            m0.call("Remote.fail", "remote boom", timeout=10)
        # machine to machine: m0 calls m1 through the handle it was given
        assert m0.call("Remote.relay", m1, "via m0", timeout=20) == "via m0"


def test_output_lines_reach_the_driver_prefixed_with_host_and_machine(system, sshd, capsys):
    with bm.start(system()) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.say", "hello from afar", timeout=10) == len("hello from afar")
        prefix = f"{sshd.host}:{sshd.port} m0: "
        seen = []

        def arrived():
            seen.append(capsys.readouterr().err)
            text = "".join(seen)
            return (prefix + "hello from afar\n" in text
                    and prefix + "hello from afar on stderr\n" in text)

        poll(arrived, timeout=10)
        assert "bigmachine-status" not in "".join(seen)


def test_shutdown_stops_the_machine_and_removes_its_run_dir_but_keeps_the_cache(system, cache):
    b = bm.start(system())
    try:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        where = m.call("Remote.where", timeout=10)
        run_dir = Path(where["cwd"])
        assert run_dir.is_dir()
        (run_dir / "tmp" / "scratch").write_text("a machine's temp file")
    finally:
        with bounded(15):
            b.shutdown()
    poll(lambda: pid_gone(where["pid"]), timeout=5)
    assert not run_dir.exists()
    assert not run_dir.parent.exists()  # the launch's dir too
    bundle = Path(where["bigmachine"]).parent.parent
    assert bundle.is_dir() and bundle.parent == cache / "bundles"
    b.shutdown()  # idempotent


def test_the_machine_dies_with_its_ssh_session(system):
    ssh = system()
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        pid = m.call("Remote.where", timeout=10)["pid"]
        for host in ssh._hosts:  # cut the SSH connection under the running machine
            for client in host.clients:
                client.get_transport().sock.shutdown(socket.SHUT_RDWR)
        poll(lambda: pid_gone(pid), timeout=10)
        m.wait(bm.State.STOPPED, timeout=10)
        assert isinstance(m.err, bm.MachineLost)
        with pytest.raises(bm.MachineLost):
            m.call("Remote.echo", 1, timeout=5)


def test_a_killed_machine_is_lost_and_its_run_dir_still_removed(system):
    with bm.start(system()) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        where = m.call("Remote.where", timeout=10)
        os.kill(where["pid"], signal.SIGKILL)  # loopback: the "remote" pid is ours to see
        with bounded(3):
            m.wait(bm.State.STOPPED, timeout=10)
        assert isinstance(m.err, bm.MachineLost)
        assert not m.process.alive(wait=5)
        assert m.process.describe_exit() == "killed by a signal (sshd reported no exit status)"
    assert not Path(where["cwd"]).exists()


def test_the_machine_dies_by_its_lease_when_keepalives_stop(system, monkeypatch):
    with bm.start(system(lease=2.0, lost_after=1.5)) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        pid = m.call("Remote.where", timeout=10)["pid"]
        monkeypatch.setattr(b, "tick", lambda now: None)  # the driver goes quiet
        poll(lambda: pid_gone(pid), timeout=8)
        m.wait(bm.State.STOPPED, timeout=10)


def test_a_second_start_uploads_nothing(system, tmp_path):
    # a snapshot of the code the machines need, so edits elsewhere cannot change it
    code = tmp_path / "code"
    (code / "tests").mkdir(parents=True)
    for name in ("__init__.py", "ssh_services.py"):
        (code / "tests" / name).write_bytes((Path(__file__).parent / name).read_bytes())
    cache = tmp_path / "fresh-cache"
    first = system(cache_dir=str(cache), user_paths=[str(code)])
    with bm.start(first) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.echo", 1, timeout=10) == 1
        assert m.call("Remote.where", timeout=10)["path"][1] == \
            str(cache / "bundles" / first.uploads[1][2])
    labels = [label for _, label, _, _ in first.uploads]
    assert labels == ["bigmachine", str(code)]
    assert len(set(h for _, _, h, _ in first.uploads)) == len(first.uploads)
    assert sorted(p.name for p in (cache / "bundles").iterdir()) == \
        sorted(h for _, _, h, _ in first.uploads)

    second = system(cache_dir=str(cache), user_paths=[str(code)])
    with bm.start(second) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.echo", 2, timeout=10) == 2
    assert second.uploads == []

    # new user code is a new bundle: only it is sent
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_mod.py").write_text("VALUE = 7\n")
    third = system(cache_dir=str(cache), user_paths=[str(code), str(extra)])
    with bm.start(third) as b:
        b.start(1, services={"Remote": Remote()}, timeout=60)
    assert [label for _, label, _, _ in third.uploads] == [str(extra)]


def test_machines_round_robin_over_hosts_and_respect_machines_per_host(system, sshd):
    # two "hosts" that are the same sshd reached by two names
    ssh = system(hosts=[f"127.0.0.1:{sshd.port}", f"[127.0.0.1]:{sshd.port}"],
                 machines_per_host=2)
    assert len(ssh._hosts) == 2
    with bm.start(ssh) as b:
        machines = b.start(3, services={"Remote": Remote()}, timeout=60)
        assert [p.process.host for p in machines] == [ssh._hosts[0], ssh._hosts[1], ssh._hosts[0]]
        m = b.start(1, services={"Remote": Remote()}, timeout=60)[0]
        assert m.process.host is ssh._hosts[1]
        with bounded(2), pytest.raises(bm.Error, match="leaves room for 0 more"):
            b.start(1, services={"Remote": Remote()}, timeout=60)


def test_two_hosts_with_their_own_addresses_and_keys_and_calls_between_them(
        system, sshd, tmp_path):
    other = sshd_fixture.Sshd(tmp_path / "sshd2", host="127.0.0.2")
    other.authorized_keys.write_text(sshd.client_pub + "\n")  # the same user key
    other.start()
    try:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line() + "\n" + other.known_hosts_line() + "\n")
        ssh = system(hosts=[f"{sshd.host}:{sshd.port}", f"{other.host}:{other.port}"],
                     known_hosts=str(known))
        with bm.start(ssh) as b:
            m0, m1 = b.start(2, services={"Remote": Remote()}, timeout=60)
            # each machine listens on the address its host was reached at
            assert m0.addr.startswith("127.0.0.1:") and m1.addr.startswith("127.0.0.2:")
            assert m0.call("Remote.relay", m1, "across hosts", timeout=20) == "across hosts"
            assert m1.call("Remote.relay", m0, "and back", timeout=20) == "and back"
    finally:
        other.stop()


def test_agent_authentication(system, sshd, tmp_path, monkeypatch):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll(sock.exists, timeout=10)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", str(sshd.client_key)], env=env, check=True,
                       capture_output=True, timeout=30)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
        with bm.start(system(key_filename=None, agent=True)) as b:
            m, = b.start(1, services={"Remote": Remote()}, timeout=60)
            assert m.call("Remote.echo", "agent", timeout=10) == "agent"
    finally:
        agent.terminate()
        agent.wait(10)


def test_extensions_built_on_the_host_when_told_to(system, sshd, tmp_path):
    # the driver's own interpreter has Cython, setuptools and a C compiler
    ssh = system(python=sys.executable, build="always", cache_dir=str(tmp_path / "c"))
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=80)
        where = m.call("Remote.where", timeout=10)
        assert where["wire"].startswith(str(tmp_path / "c" / "bundles"))
        assert where["decoder"].startswith(str(tmp_path / "c" / "bundles"))
        assert where["connection"].startswith(str(tmp_path / "c" / "bundles"))
        assert where["connection"].endswith(".so"), where["connection"]
        assert m.call("Remote.echo", b"x" * 1000, timeout=10) == b"x" * 1000


def test_tunnel_forwards_machine_connections_through_ssh(system, sshd):
    ssh = system(tunnel=True, machines_per_host=2)
    with bm.start(ssh) as b:
        m0, m1 = b.start(2, services={"Remote": Remote()}, timeout=60)
        for m in (m0, m1):
            own = m.info()["addr"]
            assert own == m.process.remote_addr and own.startswith("127.0.0.1:")
            assert m.addr == m.process.forwarder.addr != own
            # the driver's address for it is a listener of ours, forwarding through sshd
            port = int(m.addr.rpartition(":")[2])
            assert any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                       for c in psutil.Process().net_connections("tcp"))
        a = np.random.default_rng(1).random(500_000)
        assert np.array_equal(m0.call("Remote.echo", a, timeout=30), a)
        assert list(m1.stream("Remote.count", 3, timeout=10)) == [0, 1, 2]
    assert all(m.process.forwarder.closed for m in (m0, m1))


# ---- host keys -------------------------------------------------------------------------


def test_unknown_host_key_is_refused_unless_accept_new_hosts(system, sshd, tmp_path):
    known = tmp_path / "ssh" / "known_hosts"
    with bounded(10), pytest.raises(bm.AuthError, match="not in known_hosts") as info:
        with bm.start(system(known_hosts=str(known))) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    assert info.value.host == f"127.0.0.1:{sshd.port}"
    assert f"127.0.0.1:{sshd.port}" in str(info.value)
    assert not known.exists()

    with bm.start(system(known_hosts=str(known), accept_new_hosts=True)) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.echo", 1, timeout=10) == 1
    assert known.read_text() == sshd.known_hosts_line() + "\n"
    # and now it is known
    with bm.start(system(known_hosts=str(known))) as b:
        b.start(1, services={"Remote": Remote()}, timeout=60)


def test_changed_host_key_is_always_refused(system, sshd, tmp_path):
    other = sshd_fixture.keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line(other) + "\n")
    for accept in (False, True):
        with bounded(10), pytest.raises(bm.AuthError, match="CHANGED") as info:
            with bm.start(system(known_hosts=str(known), accept_new_hosts=accept)) as b:
                b.start(1, services={"Remote": Remote()}, timeout=30)
        assert info.value.host == f"127.0.0.1:{sshd.port}"
    assert known.read_text() == sshd.known_hosts_line(other) + "\n"


def test_hashed_known_hosts_entries_are_understood(system, sshd, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line() + "\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True,
                   timeout=30)
    assert known.read_text().startswith("|1|")
    with bm.start(system(known_hosts=str(known))) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.echo", 3, timeout=10) == 3


# ---- errors: clear, and in bounded time ---------------------------------------------------


def test_wrong_key_is_refused_naming_the_host(system, sshd, tmp_path):
    stranger = tmp_path / "stranger"
    sshd_fixture.keygen(stranger)
    with bounded(10), pytest.raises(bm.AuthError, match="was refused") as info:
        with bm.start(system(key_filename=str(stranger))) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    assert info.value.host == f"127.0.0.1:{sshd.port}"
    assert str(stranger) in str(info.value)


def test_unreachable_host(system):
    port = sshd_fixture.free_port()  # nothing listens there
    with bounded(5), pytest.raises(bm.Error, match=f"cannot reach SSH host 127.0.0.1:{port}"):
        with bm.start(system(hosts=[f"127.0.0.1:{port}"])) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)


def test_a_host_that_never_speaks_ssh(system):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        with bounded(6), pytest.raises(bm.Error, match="did not speak SSH"):
            with bm.start(system(hosts=[f"127.0.0.1:{port}"], connect_timeout=1.5)) as b:
                b.start(1, services={"Remote": Remote()}, timeout=30)
    finally:
        listener.close()


def test_no_python_on_the_host(system):
    with bounded(10), pytest.raises(bm.Error, match="no Python on 127.0.0.1:.*not found"):
        with bm.start(system(python="/nonexistent/python3")) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)


def test_too_old_python_on_the_host(system):
    other = sshd_fixture.other_python()
    assert other, "this machine has no Python of another minor version to test with"
    with bounded(15), pytest.raises(bm.Error, match=r"has Python 3\.\d+\.\d+ at") as info:
        with bm.start(system(python=other)) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    assert "major.minor" in str(info.value)
    version = tuple(int(x) for x in re.search(r"Python (3\.\d+)", str(info.value))[1].split("."))
    if version < (3, 9):
        assert "too old" in str(info.value)


def test_missing_numpy_on_the_host(system, bare_venv):
    with bounded(10), pytest.raises(bm.Error, match="lacks numpy, cloudpickle"):
        with bm.start(system(python=bare_venv)) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)


def test_no_cython_on_the_host_when_extensions_must_be_built(system, tmp_path):
    with bounded(20), pytest.raises(bm.Error, match="cannot build bigmachine's Cython"):
        with bm.start(system(build="always", cache_dir=str(tmp_path / "c"))) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    assert not any((tmp_path / "c" / "bundles").iterdir())  # no half-made bundle left


def test_a_machine_crashing_at_start_reports_its_last_output(system, venv, tmp_path):
    wrapper = tmp_path / "crashing-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *bigmachine._worker*)\n'
        "  echo 'about to start'\n"
        "  echo 'boom: crashing on purpose' >&2\n"
        "  exit 3;;\n"
        "esac\n"
        f'exec {venv} "$@"\n')
    wrapper.chmod(0o755)
    with bounded(15), pytest.raises(bm.Error, match="exited before it was ready") as info:
        with bm.start(system(python=str(wrapper))) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    text = str(info.value)
    assert "boom: crashing on purpose" in text and "about to start" in text
    assert "exit status 3" in text


def test_a_machine_that_never_reports_times_out(system, venv, tmp_path):
    wrapper = tmp_path / "hanging-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *bigmachine._worker*) echo stuck; exec sleep 60;; esac\n'
        f'exec {venv} "$@"\n')
    wrapper.chmod(0o755)
    with bounded(10), pytest.raises(bm.Error, match="did not start within 2 s") as info:
        with bm.start(system(python=str(wrapper))) as b:
            b.start(1, services={"Remote": Remote()}, timeout=2)
    assert "stuck" in str(info.value)


def test_user_bundles_follow_include_and_exclude(tmp_path):
    from bigmachine.backends._bundle import DEFAULT_EXCLUDE, user_bundle, user_paths

    root = tmp_path / "project"
    for rel in ("a.py", "notes.txt", "data.bin", "sub/b.py", "skip/c.py", "sub/skip/d.py",
                ".hidden/e.py", "__pycache__/f.py", "venv/g.py", "venv/pyvenv.cfg",
                "cache/CACHEDIR.TAG", "cache/h.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    bundle = user_bundle(str(root), ("*.py", "*.txt"), DEFAULT_EXCLUDE + ("skip",))
    assert sorted(bundle.files) == ["a.py", "notes.txt", "sub/b.py"]
    assert user_bundle(str(root), ("*.py",), DEFAULT_EXCLUDE + ("sub/*",)).files.keys() \
        == {"a.py", "skip/c.py"}
    # the hash is the content's: the same files give the same bundle, a change another
    same = user_bundle(str(root), ("*.py", "*.txt"), DEFAULT_EXCLUDE + ("skip",))
    assert same.hash == bundle.hash
    (root / "a.py").write_text("changed")
    assert user_bundle(str(root), ("*.py", "*.txt"), DEFAULT_EXCLUDE + ("skip",)).hash \
        != bundle.hash
    # the default user paths: the cwd and sys.path entries outside any installation
    paths = user_paths()
    assert paths[0] == os.getcwd()
    assert not any("site-packages" in p or p.startswith(sys.prefix) for p in paths)


def test_options_are_checked():
    with pytest.raises(bm.Error, match="machines_per_host"):
        bm.SSH(hosts=["h"], machines_per_host=0)
    with pytest.raises(bm.Error, match="at least one host"):
        bm.SSH(hosts=[])
    assert _parse_host("h", None, 22) == ("h", None, 22)
    assert _parse_host("u@h:2222", "v", 22) == ("h", "u", 2222)
    assert _parse_host("[::1]:2200", None, 22) == ("::1", None, 2200)
    assert _parse_host("::1", None, 22) == ("::1", None, 22)
    assert bm.SSH(hosts=["h"]).tls is True
    assert bm.SSH(hosts=["h"], tls=False).tls is False


def test_min_machines_keeps_the_hosts_that_came_up(system, sshd):
    """Two hosts, one of which refuses connections: min_machines=1 keeps the machine on
    the other, and the one that could not start is STOPPED with the cause."""
    dead = sshd_fixture.free_port()
    with bounded(30), bm.start(system(hosts=[f"{sshd.host}:{sshd.port}", f"127.0.0.1:{dead}"],
                                      connect_timeout=2.0)) as b:
        machines = b.start(2, services={"Remote": Remote()}, timeout=60, min_machines=1)
        assert len(machines) == 1 and machines[0].call("Remote.echo", "up", timeout=10) == "up"
        failed = [r for r in b.status() if r.state == "STOPPED"]
        assert len(failed) == 1 and f"127.0.0.1:{dead}" in failed[0].err, failed
        # the next machine goes to the host with room, the dead one: nothing starts
        with pytest.raises(bm.Error, match="cannot reach"):
            b.start(1, services={"Remote": Remote()}, timeout=30)


def test_one_system_serves_one_session_after_another(system):
    ssh = system()
    for i in range(2):
        with bm.start(ssh) as b:
            m, = b.start(1, services={"Remote": Remote()}, timeout=60)
            assert m.call("Remote.echo", i, timeout=10) == i
