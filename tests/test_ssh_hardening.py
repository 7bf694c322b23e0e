"""bm.SSH against what another user, or a careless value, could do (issue 10).

The host's cache (bundles, envs, run dirs) is private and checked before
use; `python=` never reaches the remote shell unquoted; the tunnel's local
listener bounds what local users can hold. Same real sshd and venv as
tests/test_ssh.py (its fixtures).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import bigmachine as bm
from bigmachine.backends._shell import join, python_argv
from bigmachine.backends.ssh import hosts, tunnel
from tests.conftest import poll
from tests.ssh_services import Remote
from tests.test_transport import run_in_thread

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).resolve().parent


@pytest.fixture
def code(tmp_path):
    """A snapshot of the code the machines need, so that its bundle never changes."""
    root = tmp_path / "code"
    (root / "tests").mkdir(parents=True)
    for name in ("__init__.py", "ssh_services.py"):
        (root / "tests" / name).write_bytes((HERE / name).read_bytes())
    return root


def start_one(ssh) -> None:
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        assert m.call("Remote.echo", 1, timeout=10) == 1


def bigmachine_bundle(cdir: Path, ssh) -> Path:
    return cdir / "bundles" / ssh.uploads[0][2]


# ---- the cache ------------------------------------------------------------------------


def test_cache_dirs_are_0700_files_0600_and_a_running_machine_holds_its_entries(
        system, code, tmp_path):
    cdir = tmp_path / "c"
    with bm.start(system(cache_dir=str(cdir), user_paths=[str(code)])) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        where = m.call("Remote.where", timeout=10)
        modes = {}
        for dirpath, dirnames, filenames in os.walk(cdir):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                modes[path] = stat.S_IMODE(path.lstat().st_mode)
        run_dir = Path(where["cwd"])
        assert run_dir in modes and run_dir / "tmp" in modes
        for path, mode in modes.items():
            assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {mode:o}"
        assert stat.S_IMODE(cdir.stat().st_mode) == 0o700
        # the machine holds (a shared flock) every entry it uses, and its run dir
        entries = [Path(p) for p in where["path"][:2]] + [run_dir]
        assert entries[0].parent == cdir / "bundles"
        for entry in entries:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)


@pytest.mark.parametrize("tamper, why", [
    ("plant", "not in its manifest"),
    ("change", "differs from its manifest"),
    ("symlink", "is a symlink"),
    ("group-writable", "writable by its group or others"),
])
def test_a_tampered_bundle_is_refused_saying_why(system, code, tmp_path, tamper, why):
    cdir = tmp_path / "c"
    first = system(cache_dir=str(cdir), user_paths=[str(code)])
    start_one(first)
    bundle = bigmachine_bundle(cdir, first)
    package = bundle / "bigmachine"
    if tamper == "plant":
        (package / "sitecustomize.py").write_text("print('planted')\n")
    elif tamper == "change":
        with open(package / "_worker.py", "a") as f:
            f.write("\nprint('changed')\n")
    elif tamper == "symlink":
        elsewhere = tmp_path / "elsewhere"
        package.rename(elsewhere)
        package.symlink_to(elsewhere)
    else:
        package.chmod(0o770)
    second = system(cache_dir=str(cdir), user_paths=[str(code)])
    with pytest.raises(bm.Error, match=why) as info:
        start_one(second)
    assert str(bundle) in str(info.value) or str(package) in str(info.value)
    assert second.uploads == []


@pytest.mark.parametrize("tamper, why", [
    ("symlinked bundles dir", "bundles is a symlink"),
    ("group-writable parent", "writable by its group or others"),
    ("parent of another user", "owned by uid 4321"),
])
def test_a_cache_that_others_could_change_is_refused(system, code, tmp_path, tamper, why):
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o700)
    cdir = parent / "c"
    if tamper == "symlinked bundles dir":
        (tmp_path / "theirs").mkdir()
        cdir.mkdir(mode=0o700)
        (cdir / "bundles").symlink_to(tmp_path / "theirs")
    elif tamper == "group-writable parent":
        parent.chmod(0o770)
    else:
        os.chown(parent, 4321, 4321)  # we are root: a directory another user owns
    with pytest.raises(bm.Error, match=why) as info:
        start_one(system(cache_dir=str(cdir), user_paths=[str(code)]))
    assert "bigmachine cache" in str(info.value)
    assert not (tmp_path / "theirs").exists() or not any((tmp_path / "theirs").iterdir())


def test_a_cache_whose_parent_does_not_exist_yet_is_made(system, code, tmp_path):
    # The default cache is ~/.cache/bigmachine: on a fresh account ~/.cache does not
    # exist yet. The cache's directories are made (0700), so its missing parents
    # must be too, not a FileNotFoundError traceback from the host.
    cdir = tmp_path / "fresh-home" / ".cache" / "bigmachine"
    start_one(system(cache_dir=str(cdir), user_paths=[str(code)]))
    assert (cdir / "bundles").is_dir()


def test_a_cache_dir_with_a_colon_neither_breaks_the_start_nor_imports_from_elsewhere(
        system, code, tmp_path):
    # The bundle's directory goes to the machine as PYTHONPATH=DIR: a ':' in the cache's
    # path splits it, so the machine searches "<tmp>/a", a directory the cache check never
    # looked at (here another user's), before the real bundle.
    cdir = tmp_path / "a:b" / "c"
    cdir.parent.mkdir(mode=0o700)
    theirs = tmp_path / "a" / "bigmachine"
    theirs.mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (theirs / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for path in (theirs.parent, theirs, theirs / "__init__.py"):
        os.chown(path, 4321, 4321)  # we are root: files of another user
    try:
        start_one(system(cache_dir=str(cdir), user_paths=[str(code)]))
    except bm.Error as exc:  # refusing such a cache_dir up front, saying so, is fine too
        assert not marker.exists(), "the machine imported another user's bigmachine"
        assert str(cdir) in str(exc) or "cache_dir" in str(exc), exc
    assert not marker.exists(), "the machine imported another user's bigmachine"


def _signal_sshd_children(sshd, sig) -> list:
    procs = psutil.Process(sshd.proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


def test_a_host_that_stalls_after_opening_a_channel_does_not_hang_the_start(
        system, sshd, code, monkeypatch):
    # The host stops answering (its sshd stalls, or the path drops packets) after a
    # channel opened: paramiko's exec_command waits for the reply with no timeout, so
    # b.start's timeout (and every host.run deadline) is never applied.
    real = hosts.open_session
    stalled = threading.Event()

    def open_then_stall(client, label, deadline):
        chan = real(client, label, deadline)
        if not stalled.is_set():
            _signal_sshd_children(sshd, signal.SIGSTOP)
            stalled.set()
        return chan

    monkeypatch.setattr(hosts, "open_session", open_then_stall)
    ssh = system(user_paths=[str(code)])

    def start():
        with bm.start(ssh) as b:
            b.start(1, services={"Remote": Remote()}, timeout=5)

    thread, box = run_in_thread(start)
    try:
        thread.join(25)
        hung = thread.is_alive()
    finally:
        _signal_sshd_children(sshd, signal.SIGCONT)
        thread.join(30)
    assert not hung, "b.start(timeout=5) still waiting after 25 s on a stalled host"
    assert isinstance(box.get("error"), bm.Error), box


DRIVER = """
import json, sys, time
import bigmachine as bm
from tests.ssh_services import Remote
b = bm.start(bm.SSH(**json.loads(sys.argv[1])))
m, = b.start(1, services={"Remote": Remote()}, timeout=60)
print(m.call("Remote.where", timeout=10)["cwd"], flush=True)
time.sleep(600)
"""


def _unheld(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_run_dir_of_a_killed_driver_is_removed_by_a_later_start(
        system, sshd, venv, code, tmp_path):
    # A driver that dies (SIGKILL, a crash, a cut link) leaves its machines' run dirs
    # (cwd and TMPDIR) in the host's cache. Its machines end by their lease and release
    # them, but prune only looks at bundles/ and envs/: run/ grows with every such driver,
    # whatever the machines left in TMPDIR, forever.
    cdir = tmp_path / "c"
    options = dict(hosts=[f"{sshd.host}:{sshd.port}"], key_filename=str(sshd.client_key),
                   known_hosts=str(sshd.known_hosts), python=venv, agent=False,
                   cache_dir=str(cdir), user_paths=[str(code)], connect_timeout=5.0,
                   keepalive_period=0.25, lost_after=5.0, lease=10.0)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(options)], cwd=code,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline().strip()
        assert line, driver.stderr.read() if driver.poll() is not None else "no run dir"
        old = Path(line)
        assert old.parent.parent == cdir / "run"
        (old / "tmp" / "scratch.bin").write_bytes(bytes(1 << 20))  # what a machine leaves
        driver.kill()
        driver.wait(10)
    finally:
        driver.kill()
        driver.wait(10)
        driver.stdout.close()
        driver.stderr.close()
    poll(lambda: _unheld(old), timeout=30)  # its machine has ended
    time.sleep(1.1)
    start_one(system(cache_dir=str(cdir), user_paths=[str(code)], cache_max_age=1))
    assert not old.exists(), f"{old} (a dead machine's run dir) is still on the host"


def test_a_cache_of_an_older_bigmachine_is_made_again(system, code, tmp_path):
    cdir = tmp_path / "c"
    first = system(cache_dir=str(cdir), user_paths=[str(code)])
    start_one(first)
    (bigmachine_bundle(cdir, first) / ".bigmachine-manifest.json").unlink()
    second = system(cache_dir=str(cdir), user_paths=[str(code)])
    start_one(second)
    assert [label for _, label, _, _ in second.uploads] == ["bigmachine"]


def test_old_bundles_are_pruned_but_never_one_a_running_machine_holds(system, tmp_path):
    cdir = tmp_path / "c"
    roots = []
    for i in range(3):
        root = tmp_path / f"code{i}"
        (root / "tests").mkdir(parents=True)
        for name in ("__init__.py", "ssh_services.py"):
            (root / "tests" / name).write_bytes((HERE / name).read_bytes())
        (root / f"version{i}.py").write_text(f"V = {i}\n")
        roots.append(root)

    def make(i, **kwargs):
        return system(cache_dir=str(cdir), user_paths=[str(roots[i])], **kwargs)

    first = make(0)
    start_one(first)
    old = cdir / "bundles" / first.uploads[1][2]
    held_system = make(1)
    with bm.start(held_system) as b:  # a machine runs from code1's bundle meanwhile
        b.start(1, services={"Remote": Remote()}, timeout=60)
        held = cdir / "bundles" / held_system.uploads[0][2]
        assert held.parent == old.parent and held != old
        # keep only what this start uses: code0's bundle goes, code1's is held
        start_one(make(2, cache_keep=1, cache_max_age=3600))
        assert not old.exists()
        assert held.is_dir()
    # once no machine holds it, it may go too (age: anything not used in the last second)
    time.sleep(1.1)
    start_one(make(2, cache_max_age=1))
    assert not held.exists()
    assert sorted(p.name for p in (cdir / "bundles").iterdir()) == sorted(
        p.name for p in (cdir / "bundles").iterdir() if not p.name.startswith("."))


# ---- values that reach the remote shell --------------------------------------------------


@pytest.mark.parametrize("python", [
    "python3 -I", "python3;id", "$(touch pwned)", "`touch pwned`", "py'thon", 'py"thon',
    "a|b", "a&&b", "x\ny", "",
])
def test_hostile_python_strings_are_refused_before_anything_runs(python, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bm.Error, match="python="):
        bm.SSH(hosts=["h"], python=python)
    with pytest.raises(bm.Error, match="argv list"):
        bm.SSH(hosts=["h"], python=["python3", 3])
    assert not (tmp_path / "pwned").exists()


def test_python_argv_words_are_quoted():
    assert python_argv("~/venv/bin/python3.11") == ["~/venv/bin/python3.11"]
    assert join(["~/a b", "$(x)", "it's", "-c"]) == '"$HOME"/\'a b\' \'$(x)\' \'it\'"\'"\'s\' -c'
    with pytest.raises(bm.Error, match=r"python=\['prlimit', '--nofile=1024:', 'python3'\]"):
        python_argv("prlimit --nofile=1024: python3")


def test_an_argv_list_runs_as_given_even_with_a_hostile_path(system, venv, tmp_path):
    odd = tmp_path / "dir with space; $(touch pwned) `touch pwned2` 'q'"
    odd.mkdir()
    (odd / "python").symlink_to(venv)
    ssh = system(python=["prlimit", "--nofile=1024:2048", str(odd / "python")])
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        pid = m.info()["pid"]
        limits = Path(f"/proc/{pid}/limits").read_text()
        # prlimit ran first: the machine raised its soft limit to prlimit's hard one
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["2048", "2048"]
                   for line in limits.splitlines()), limits
    assert not list(tmp_path.glob("**/pwned*")) and not Path("pwned").exists()


# ---- the tunnel --------------------------------------------------------------------------


def test_the_tunnel_bounds_local_connections_and_closes_silent_ones(system):
    with bm.start(system(tunnel=True)) as b:
        m, = b.start(1, services={"Remote": Remote()}, timeout=60)
        forwarder = m.process.forwarder
        assert (forwarder.max_connections, forwarder.first_bytes) == \
            (tunnel.MAX_CONNECTIONS, tunnel.FIRST_BYTES)
        forwarder.max_connections, forwarder.first_bytes = 8, 1.5  # a smaller flood suffices
        host, port = m.addr.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port))) for _ in range(20)]
        try:
            poll(lambda: len(forwarder.conns) == 8 and forwarder.silent, timeout=5)
            assert len(forwarder.conns) <= 8
            # a member's dial still gets in (it speaks at once: room is made for it)
            other = b.dial(m.addr)
            assert other.call("Remote.echo", "through the flood", timeout=10) == \
                "through the flood"
            assert m.call("Remote.echo", 2, timeout=10) == 2
            # every silent connection is closed by its deadline
            started = time.monotonic()
            for s in idle:
                s.settimeout(5)
                assert s.recv(1) == b""
            assert time.monotonic() - started < 4
            poll(lambda: not forwarder.silent, timeout=3)
        finally:
            for s in idle:
                s.close()
