"""bm.SSH over real network links: each host is a Linux network namespace.

The module's fixture builds, for this run only, a small lab in the test
process's network namespace:

- a bridge ``bmt<id>br`` holding 10.213.N.1/24, N picked free under a lock
  (two runs at once, pytest -n 2 or not, never share a subnet or a name);
- per host, a namespace ``bmtest-<id>-<pid>-<a|b>`` joined to the bridge by
  a veth pair (``bmt<id><h>0`` on our side, ``bmt<id><h>1`` inside), with
  ``lo`` up and 10.213.N.(2, 3)/24; no default route anywhere, so traffic only
  goes between these addresses (and loopback);
- in each namespace its own OpenSSH sshd on port 22 (``ip netns exec``),
  with its own host key, and an authorized key made for the run.

Machines are started by those sshds, so they run inside the namespaces, bind
the namespace address sshd reports, and reach each other across the bridge.
Cutting a host's link (its bridge port goes down) loses the machine behind it
within the keepalive timing, while the other host's machine keeps answering.

Everything is torn down in the fixture's finalizer, failed tests or not. The
tests need root and iproute2 (installed with apt when missing): without them
they fail, they never skip.
"""
from __future__ import annotations

import fcntl
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
import pytest

import bigmachine as bm
from tests import sshd as sshd_fixture
from tests.conftest import poll
from tests.ssh_services import Remote

pytestmark = pytest.mark.timeout(90)

KEEPALIVE, LOST_AFTER, LEASE = 0.5, 3.0, 5.0
TIMING = dict(keepalive_period=KEEPALIVE, lost_after=LOST_AFTER, lease=LEASE)
LOCK = "/run/bmtest-netns.lock"  # held while a run picks its subnet and makes its bridge
ROOT = Path(__file__).resolve().parent.parent

# ---- the lab --------------------------------------------------------------------------


def ip(*args: str, ns: Optional[str] = None, timeout: float = 10.0) -> str:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    return sshd_fixture._run(argv, timeout=timeout).stdout


def ensure_ip() -> None:
    assert os.geteuid() == 0, ("the network-namespace SSH tests must run as root "
                               "(they create namespaces, veths and a bridge)")
    if shutil.which("ip") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sshd_fixture._run(["apt-get", "update"], timeout=300, env=env)
        sshd_fixture._run(["apt-get", "install", "-y", "--no-install-recommends", "iproute2"],
                          timeout=600, env=env)
    assert shutil.which("ip"), "iproute2's ip is missing and could not be installed"


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process in namespace ns (our sshd and what it started)."""
    try:
        pids = [int(p) for p in ip("netns", "pids", ns).split()]
    except sshd_fixture.FixtureError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def netns_names() -> list[str]:
    """The named namespaces (what `ip netns list` shows, without its races)."""
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def remove_stale() -> None:
    """Remove the namespaces and bridges of earlier runs whose pytest died unfinished."""
    for ns in netns_names():
        m = re.fullmatch(r"bmtest-([0-9a-f]{6})-(\d+)-[a-z]", ns)
        if not m or _pid_alive(int(m[2])):
            continue
        _kill_netns_pids(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", f"bmt{m[1]}br"], capture_output=True, timeout=10)


class NsHost:
    """One namespace with its veth to the bridge, its address and its sshd."""

    def __init__(self, lab: "Lab", letter: str, index: int):
        self.lab = lab
        self.letter = letter
        self.ns = f"bmtest-{lab.id}-{os.getpid()}-{letter}"
        self.outer = f"bmt{lab.id}{letter}0"  # our side: a port of the bridge
        self.inner = f"bmt{lab.id}{letter}1"
        self.index = index
        self.root = lab.root / letter
        self.proc: Optional[subprocess.Popen] = None
        self.inode = 0

    @property
    def addr(self) -> str:
        return f"{self.lab.subnet}.{self.index}"

    def build(self) -> None:
        self.root.mkdir(mode=0o700)
        ip("netns", "add", self.ns)
        self.inode = os.stat(f"/run/netns/{self.ns}").st_ino
        ip("link", "set", "lo", "up", ns=self.ns)
        ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner,
           "netns", self.ns)
        ip("link", "set", self.outer, "addrgenmode", "none")  # no IPv6 chatter
        ip("link", "set", self.outer, "master", self.lab.bridge)
        ip("link", "set", self.outer, "up")
        ip("link", "set", self.inner, "addrgenmode", "none", ns=self.ns)
        ip("addr", "add", f"{self.addr}/24", "dev", self.inner, ns=self.ns)
        ip("link", "set", self.inner, "up", ns=self.ns)
        self.start_sshd()

    def start_sshd(self, timeout: float = 20.0) -> None:
        sshd = sshd_fixture.ensure_sshd()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.host_pub = sshd_fixture.keygen(self.host_key, f"bigmachine-netns-{self.letter}")
        config = self.root / "sshd_config"
        config.write_text(sshd_fixture._CONFIG.format(
            port=22, host=self.addr, host_key=self.host_key,
            authorized_keys=self.lab.authorized_keys, user=sshd_fixture._username(),
            pid=self.root / "sshd.pid"))
        self.log = self.root / "sshd.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # from our namespace, across the bridge
            assert self.proc.poll() is None, f"sshd in {self.ns} exited:\n{self.log_tail()}"
            try:
                with socket.create_connection((self.addr, 22), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"sshd in {self.ns} did not answer within {timeout} s:\n"
                             f"{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def known_hosts_line(self) -> str:
        keytype, blob = self.host_pub.split()[:2]
        return f"{self.addr} {keytype} {blob}"  # port 22: no [host]:port form

    def cut(self) -> None:
        ip("link", "set", self.outer, "down")

    def mend(self) -> None:
        ip("link", "set", self.outer, "up")

    def teardown(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        _kill_netns_pids(self.ns)  # the sessions sshd forked, and anything they left
        if os.path.exists(f"/run/netns/{self.ns}"):
            ip("netns", "del", self.ns)  # takes its veth pair with it
        # Deleting the namespace removes the pair asynchronously: it may vanish
        # between our look and our delete, which is no failure.
        gone = subprocess.run(["ip", "link", "del", self.outer], capture_output=True, text=True,
                              timeout=10)
        if gone.returncode != 0 and "Cannot find device" not in gone.stderr:
            raise RuntimeError(f"ip link del {self.outer} failed: {gone.stderr}")


class Lab:
    def __init__(self, root: Path, letters: str = "ab"):
        self.id = secrets.token_hex(3)
        self.root = root
        self.bridge = f"bmt{self.id}br"
        self.subnet = ""
        self.bridge_made = False
        self.client_key = root / "id_ed25519"
        self.authorized_keys = root / "authorized_keys"
        self.known_hosts = root / "known_hosts"
        self.cache = root / "cache"
        self.hosts = [NsHost(self, letter, 2 + i) for i, letter in enumerate(letters)]

    def build(self) -> None:
        self.authorized_keys.write_text(sshd_fixture.keygen(self.client_key) + "\n")
        os.chmod(self.authorized_keys, 0o600)
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
            remove_stale()
            taken = set(re.findall(r"\b10\.213\.(\d+)\.", ip("-4", "addr") + ip("-4", "route")))
            free = [n for n in range(1, 255) if str(n) not in taken]
            assert free, "no free 10.213.N.0/24 subnet left for the test"
            self.subnet = f"10.213.{random.choice(free)}"
            ip("link", "add", self.bridge, "type", "bridge")
            self.bridge_made = True
            ip("link", "set", self.bridge, "addrgenmode", "none")
            ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            host.build()
        self.known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in self.hosts))

    def sshd_pids(self) -> set[int]:
        return {h.proc.pid for h in self.hosts if h.proc is not None}

    def workers(self) -> list[psutil.Process]:
        """bigmachine._worker processes in our namespaces or under our sshds."""
        inodes = {h.inode for h in self.hosts}
        sshds = self.sshd_pids()
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "bigmachine._worker" not in (p.info["cmdline"] or ()):
                    continue
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                ours = os.stat(f"/proc/{p.pid}/ns/net").st_ino in inodes or any(
                    a.pid in sshds for a in p.parents())
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
            if ours:
                found.append(p)
        return found

    def teardown(self) -> list[str]:
        errors = []
        for host in self.hosts:
            try:
                host.teardown()
            except Exception as exc:  # go on: remove all we can, then report
                errors.append(f"{host.ns}: {exc}")
        if self.bridge_made:
            try:
                ip("link", "del", self.bridge)
            except Exception as exc:
                errors.append(f"{self.bridge}: {exc}")
        return errors


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ensure_ip()
    lab = Lab(tmp_path_factory.mktemp("netns"))
    left: list = []
    try:
        lab.build()
        yield lab
        left = [" ".join(p.info["cmdline"] or ()) for p in lab.workers()]  # read when listed
    finally:
        errors = lab.teardown()  # whatever happened above
    stray = [ns for ns in netns_names() if lab.id in ns]
    stray += [line for line in ip("-o", "link").splitlines() if f"bmt{lab.id}" in line]
    assert not left, f"machines outlived the tests: {left}"
    assert not errors and not stray, f"cleanup failed: {errors} {stray}"


@pytest.fixture
def system(lab):
    def make(**kwargs):
        options = dict(hosts=[h.addr for h in lab.hosts], key_filename=str(lab.client_key),
                       known_hosts=str(lab.known_hosts), python=sys.executable, agent=False,
                       cache_dir=str(lab.cache), user_paths=[str(ROOT)], connect_timeout=5.0,
                       machines_per_host=1, **TIMING)
        options.update(kwargs)
        return bm.SSH(**options)

    return make


@pytest.fixture(autouse=True)
def no_machines_left(lab):
    """After each test: the links are up again, every machine in the namespaces
    is gone, and so is every SSH session (the sshds have no children left)."""
    yield
    for host in lab.hosts:
        host.mend()

    def sessions():
        alive = []
        for h in lab.hosts:
            for p in psutil.Process(h.proc.pid).children(recursive=True):
                try:  # a session may end between listing and reading it
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {' '.join(p.cmdline())}")
                except psutil.NoSuchProcess:
                    pass
        return alive

    poll(lambda: not lab.workers(), timeout=10)
    # a session whose link was cut ends at sshd's next retransmission (RST)
    poll(lambda: not sessions(), timeout=20)


def pid_gone(pid: int) -> bool:
    return not _pid_alive(pid)


def tcp_connections(pid: int) -> list[tuple[str, str]]:
    """(local ip, "remote ip:port") of pid's established IPv4 TCP sockets, read
    from /proc/<pid>/net/tcp: the view of pid's own network namespace, which
    psutil (it reads /proc/net/tcp, ours) does not give."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])

    def addr(field: str) -> tuple[str, int]:
        host, port = field.split(":")
        return socket.inet_ntoa(bytes.fromhex(host)[::-1]), int(port, 16)

    found = []
    for line in open(f"/proc/{pid}/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[9] in inodes:  # TCP_ESTABLISHED
            (local, _), (remote, port) = addr(fields[1]), addr(fields[2])
            found.append((local, f"{remote}:{port}"))
    return found


def ancestors(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).parents()}


# ---- the tests ----------------------------------------------------------------------------


def test_machines_run_inside_the_namespaces_and_call_each_other_across_them(system, lab):
    a, b_host = lab.hosts
    with bm.start(system()) as b:
        m_a, m_b = b.start(2, services={"Remote": Remote()}, timeout=60)
        # one machine per host, each listening on its namespace's address
        assert [m.process.host.host for m in (m_a, m_b)] == [a.addr, b_host.addr]
        assert m_a.addr.startswith(f"{a.addr}:") and m_b.addr.startswith(f"{b_host.addr}:")
        here = os.stat("/proc/self/ns/net").st_ino
        pids = {}
        for m, host in ((m_a, a), (m_b, b_host)):
            where = m.call("Remote.where", timeout=10)
            pid = pids[host.letter] = where["pid"]
            # a process of that namespace's sshd, in that namespace, not ours
            assert host.proc.pid in ancestors(pid)
            assert os.getpid() != psutil.Process(pid).ppid()
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == host.inode != here
            assert where["cwd"].startswith(str(lab.cache / "run") + "/")
        assert m_a.call("Remote.echo", "to a", timeout=10) == "to a"
        assert m_b.call("Remote.echo", "to b", timeout=10) == "to b"
        arr = np.random.default_rng(7).random(300_000)
        assert np.array_equal(m_b.call("Remote.echo", arr, timeout=30), arr)
        assert list(m_a.stream("Remote.count", 4, timeout=10)) == [0, 1, 2, 3]

        # machine to machine: a dials b by the handle it was given, across the bridge
        assert m_a.call("Remote.relay", m_b, "a to b", timeout=20) == "a to b"
        assert m_b.call("Remote.relay", m_a, "b to a", timeout=20) == "b to a"

        # seen from inside each namespace: a direct connection to the other machine
        assert any(lo == a.addr and far == m_b.addr for lo, far in tcp_connections(pids["a"]))
        assert any(lo == b_host.addr and far == m_a.addr
                   for lo, far in tcp_connections(pids["b"]))
    for pid in pids.values():
        poll(lambda: pid_gone(pid), timeout=10)


def test_a_cut_link_loses_the_machine_behind_it_while_the_other_keeps_answering(system, lab):
    a, b_host = lab.hosts
    with bm.start(system()) as b:
        m_a, m_b = b.start(2, services={"Remote": Remote()}, timeout=60)
        pid_a = m_a.call("Remote.where", timeout=10)["pid"]
        pid_b = m_b.call("Remote.where", timeout=10)["pid"]
        assert m_a.call("Remote.relay", m_b, "before", timeout=20) == "before"

        b_host.cut()
        cut = time.monotonic()
        answered = 0
        deadline = cut + LOST_AFTER + 2.0
        while m_b.state != bm.State.STOPPED and time.monotonic() < deadline:
            # a answers all along, each call well inside the loss window
            assert m_a.call("Remote.echo", answered, timeout=LOST_AFTER) == answered
            answered += 1
            time.sleep(0.1)
        m_b.wait(bm.State.STOPPED, timeout=max(0.1, deadline - time.monotonic()))
        lost = time.monotonic() - cut
        print(f"\nmachine behind the cut link lost after {lost:.2f} s "
              f"(lost_after={LOST_AFTER:g}, keepalive_period={KEEPALIVE:g}); "
              f"the other answered {answered} calls meanwhile")
        assert isinstance(m_b.err, bm.MachineLost), m_b.err
        assert lost <= LOST_AFTER + 2.0
        assert answered >= 5
        with pytest.raises(bm.MachineLost):
            m_b.call("Remote.echo", 1, timeout=5)
        assert m_a.state == bm.State.RUNNING
        assert m_a.call("Remote.echo", "still here", timeout=5) == "still here"

        # cut off from its driver, b's machine stops itself when its lease runs out
        poll(lambda: pid_gone(pid_b), timeout=LEASE + 5 - (time.monotonic() - cut))
        assert _pid_alive(pid_a)
        assert m_a.call("Remote.echo", "and still", timeout=5) == "and still"

        b_host.mend()  # so that the SSH sessions to b can close
        start = time.monotonic()
    print(f"shutdown took {time.monotonic() - start:.2f} s")
    poll(lambda: pid_gone(pid_a), timeout=10)


def test_a_host_whose_link_is_down_is_unreachable_in_bounded_time(system, lab):
    a, b_host = lab.hosts
    b_host.cut()
    start = time.monotonic()
    with pytest.raises(bm.Error, match=f"cannot reach SSH host {b_host.addr}: no answer"):
        with bm.start(system(hosts=[b_host.addr], connect_timeout=1.5)) as b:
            b.start(1, services={"Remote": Remote()}, timeout=30)
    assert time.monotonic() - start < 6


def test_shutdown_while_a_link_is_cut_is_bounded_and_the_machine_there_stops_by_its_lease(
        system, lab):
    a, b_host = lab.hosts
    b = bm.start(system())
    try:
        m_a, m_b = b.start(2, services={"Remote": Remote()}, timeout=60)
        pid_a = m_a.call("Remote.where", timeout=10)["pid"]
        pid_b = m_b.call("Remote.where", timeout=10)["pid"]
        b_host.cut()
        cut = time.monotonic()
        m_b.wait(bm.State.STOPPED, timeout=LOST_AFTER + 2.0)
        assert isinstance(m_b.err, bm.MachineLost), m_b.err
    finally:
        start = time.monotonic()
        b.shutdown()  # the link to b is still down
        took = time.monotonic() - start
    print(f"\nshutdown with a host cut off took {took:.2f} s")
    # a is stopped at once; b's machine cannot be reached to be killed: the
    # driver gives up after a short grace and a 5 s kill attempt
    assert took < 12
    poll(lambda: pid_gone(pid_a), timeout=5)
    poll(lambda: pid_gone(pid_b), timeout=max(1.0, cut + LEASE + 5 - time.monotonic()))
