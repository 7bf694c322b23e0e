"""Who can reach a link, and what a non-member can do to one (issue 10).

- Local and InProcess links are Unix sockets in a private directory, checked
  with SO_PEERCRED: a process of another user cannot connect at all.
- TCP links are TLS: a relay on the path that rewrites or injects bytes after
  the handshake breaks the link with a typed error, and nothing reaches a
  service or is unpickled; with insecure=True the same rewrite succeeds (what
  insecure gives up). A member relayed into another member's address is refused.
- Only a machine's owner may register, renew or shut it down; internals are
  not callable; machines write no core files; certificates renew themselves;
  plain TCP needs insecure=True.

Other users are real: forked children that drop to uid/gid 65534 (nobody).
"""
from __future__ import annotations

import logging
import os
import pickle
import resource
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable

import pytest

import bigmachine as bm
from bigmachine import _wire
from bigmachine._admission import Admission
from bigmachine._auth import Credentials
from bigmachine._node import Node
from tests.conftest import TIMING, poll
from tests.link_services import Ledger, Peer
from tests.rawpeer import connect
from tests.relay import PathRelay

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
SERVICES = {"Ledger": Ledger(), "Peer": Peer()}


# ---- another user -----------------------------------------------------------------


def as_nobody(body: Callable[[], str], timeout: float = 10.0) -> str:
    """Run body in a forked child as uid/gid nobody; return what it returned (a str)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only simple system calls from here
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = body()
        except BaseException as exc:  # reported to the parent
            out = f"raised {type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:4000])
        os._exit(0)
    os.close(w)
    try:
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the child of another user did not finish"
            import select
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return data.decode()


def try_connect(path: str) -> Callable[[], str]:
    def body() -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect(path)
        except OSError as exc:
            return f"refused {type(exc).__name__} {exc.errno}"
        try:
            s.sendall(os.urandom(64))  # a stranger's bytes where a hello belongs
            data = s.recv(100)
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        return f"connected, read {len(data)} bytes"
    return body


@pytest.mark.parametrize("system", [bm.Local, bm.InProcess])
def test_another_user_cannot_reach_local_or_inprocess_machines(system):
    with bm.start(system(), **TIMING) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=30)
        path = m0.addr[5:]
        assert m0.addr.startswith("unix:/")
        directory = os.path.dirname(path)
        st = os.stat(directory)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        out = as_nobody(try_connect(path))
        assert out == f"refused PermissionError {13}", out
        # members go on serving
        assert m0.call("Peer.call", m1, "Ledger.record", "after", timeout=10) == "after"


def test_peer_credentials_refuse_another_user_even_where_the_path_is_open(caplog):
    """Defence in depth: were the directory opened up, the peer's uid still decides."""
    caplog.set_level(logging.WARNING, logger="bigmachine")
    root = tempfile.mkdtemp(prefix="bm-open-")
    creds = Credentials.generate()
    node = Node(creds, "victim", workers=2)
    node.start_thread()
    try:
        path = f"{root}/victim.sock"
        node.run_sync(node.listen(f"unix:{path}"), timeout=5)
        os.chmod(root, 0o755)
        os.chmod(path, 0o666)  # what a careless user might do
        out = as_nobody(try_connect(path))
        assert out == "connected, read 0 bytes", out  # closed without a word
        poll(lambda: "runs as uid 65534" in caplog.text, timeout=5)
        assert not node.accepted
    finally:
        node.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_dialler_refuses_a_unix_server_of_another_user():
    root = tempfile.mkdtemp(prefix="bm-evil-")
    os.chmod(root, 0o777)
    path = f"{root}/impostor.sock"
    result: list = []

    def impostor() -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o666)
        s.listen(1)
        s.settimeout(8)
        conn, _ = s.accept()
        conn.settimeout(3)
        try:
            got = conn.recv(100)
        except OSError:
            got = b""
        return f"got {len(got)} bytes"

    t = threading.Thread(target=lambda: result.append(as_nobody(impostor)))
    t.start()
    try:
        poll(lambda: os.path.exists(path), timeout=5)
        with bm.start(bm.InProcess(), **TIMING) as b:
            with pytest.raises(bm.AuthError, match="uid 65534"):
                b.dial(f"unix:{path}").call("Ledger.seen", timeout=5)
    finally:
        t.join(15)
        shutil.rmtree(root, ignore_errors=True)
    assert result == ["got 0 bytes"], result  # not even our hello reached it


# ---- a relay on a TCP path ------------------------------------------------------------


@contextmanager
def tamper(target: str):
    with PathRelay(lambda: target) as relay:
        yield relay


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def evil_request(canary: str) -> bytes:
    """A well-formed REQUEST whose pickle would create the canary file."""
    payload = pickle.dumps(_Canary(canary), protocol=5)
    units, _ = _wire.message_frames(99, _wire.MTYPE_REQUEST, 0, [payload])
    return b"".join(bytes(buf) for unit in units for buf in unit)


class _Canary:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _relay_attacks(b, m0, m1, tmp_path, tls: bool) -> None:
    """Rewrite, corrupt and inject through a relay in front of m0; a member relayed
    into m0's place. What must hold depends on tls."""
    canary = str(tmp_path / "canary")
    # A member relayed into another member's address: refused, by name.
    with tamper(m1.addr) as relay:
        with pytest.raises(bm.AuthError, match="'m1', not 'm0'"):
            b.dial(relay.addr, "m0").call("Ledger.seen", timeout=10)
    # Rewriting an argument after the handshake: under TLS the relay never sees it.
    with tamper(m0.addr) as relay:
        handle = b.dial(relay.addr, "m0")
        assert handle.call("Ledger.record", "warm-up", timeout=10) == "warm-up"
        relay.arm(edit=lambda d: d.replace(b"ORIGINAL-ARG", b"REWRITTEN!!!"))
        got = handle.call("Ledger.record", "ORIGINAL-ARG", timeout=10)
    seen = m0.call("Ledger.seen", timeout=10)
    if not tls:  # what insecure=True gives up: the rewrite reaches the service
        assert got == "REWRITTEN!!!" and "REWRITTEN!!!" in seen and "ORIGINAL-ARG" not in seen
        return
    assert got == "ORIGINAL-ARG" and "REWRITTEN!!!" not in seen, seen
    # Corrupting one byte of a call, and injecting a pickled REQUEST.
    for arm in (dict(edit=flip_last_byte), dict(inject=evil_request(canary))):
        with tamper(m0.addr) as relay:
            handle = b.dial(relay.addr, "m0")
            assert handle.call("Ledger.record", "fine", timeout=10) == "fine"
            relay.arm(**arm)
            with pytest.raises((bm.MachineLost, bm.ProtocolError)):
                handle.call("Ledger.record", "tampered", timeout=5)
    assert "tampered" not in m0.call("Ledger.seen", timeout=10)
    assert not os.path.exists(canary), "an injected pickle ran"
    # the members go on serving
    assert m0.call("Peer.call", m1, "Ledger.record", "still", timeout=10) == "still"


def test_relay_cannot_rewrite_or_inject_on_tls_links(tmp_path):
    with bm.start(bm.Local(tls=True), **TIMING) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=30)
        assert not m0.addr.startswith("unix:")
        _relay_attacks(b, m0, m1, tmp_path, tls=True)


def ssh_system(sshd, cache, **kwargs) -> bm.SSH:
    return bm.SSH(hosts=[f"{sshd.host}:{sshd.port}"], key_filename=str(sshd.client_key),
                  known_hosts=str(sshd.known_hosts), python=kwargs.pop("python", sys.executable),
                  agent=False, cache_dir=str(cache), connect_timeout=5.0, machines_per_host=2,
                  **kwargs)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "insecure"])
def test_relay_on_an_ssh_link(sshd, tmp_path, tls):
    options = dict(TIMING, lease=10.0)
    if not tls:
        options.update(tls=False, insecure=True)
    with bm.start(ssh_system(sshd, tmp_path / "cache"), **options) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=60)
        _relay_attacks(b, m0, m1, tmp_path, tls=tls)


def test_descriptor_flood_of_an_ssh_machine_started_at_1024_open_files(sshd, tmp_path):
    """1,100 idle connections held open by a non-member, against a machine whose soft
    limit started at 1,024: it raises its limit, closes idle strangers at the
    first-byte deadline, and the driver's calls and new dials keep working."""
    wrapper = tmp_path / "python1024"
    wrapper.write_text(f"#!/bin/sh\nulimit -S -n 1024\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    with bm.start(ssh_system(sshd, tmp_path / "cache", python=str(wrapper)),
                  **dict(TIMING, lease=10.0)) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=60)
        limits = m0.call("Ledger.limits", timeout=10)
        assert limits["nofile"][0] > 1100, limits  # raised from 1,024 at start
        host, port = m0.addr.rsplit(":", 1)
        flood: list = []
        stop = threading.Event()

        def hold() -> None:  # keep 1,100 strangers connected, reopening what is closed
            while not stop.is_set():
                flood[:] = [s for s in flood if s.fileno() >= 0]
                while len(flood) < 1100 and not stop.is_set():
                    try:
                        flood.append(socket.create_connection((host, int(port)), timeout=2))
                    except OSError:
                        break
                time.sleep(0.05)
                for s in list(flood):
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            s.close()
                    except BlockingIOError:
                        pass
                    except OSError:
                        s.close()

        t = threading.Thread(target=hold)
        t.start()
        try:
            poll(lambda: len(flood) >= 1100, timeout=20)
            for i in range(20):
                assert m0.call("Ledger.record", i, timeout=10) == i
            # a new connection during the flood: m1 dials m0 for the first time
            assert m1.call("Peer.call", m0, "Ledger.record", "dialled", timeout=15) == "dialled"
        finally:
            stop.set()
            t.join(15)
            for s in flood:
                s.close()


# ---- owners, internals, limits, certificates ------------------------------------------


def test_only_the_owner_may_register_or_stop_a_machine():
    with bm.start(bm.Local(), **TIMING) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=30)
        for method, args in (("Supervisor.shutdown", ()), ("Supervisor.register", ({},)),
                             ("Supervisor.renew", ({},))):
            for token in ({}, {"token": os.urandom(32)}, {"token": "x"}):
                with pytest.raises(bm.AuthError, match="only its owner"):
                    m1.call("Peer.call", m0, method, *args, timeout=10, **token)
        for internal in ("Supervisor.watchdog", "Supervisor._watchdog", "Supervisor._check_owner"):
            with pytest.raises(bm.Error, match="has no method"):
                m0.call(internal, timeout=10)
        assert m0.call("Ledger.record", 1, timeout=10) == 1  # still running
        # the owner's token works, on whichever connection it comes
        token = b.node.creds.owner_token("m0")
        m1.call("Peer.call", m0, "Supervisor.shutdown", timeout=10, token=token)
        assert m0.wait(bm.State.STOPPED, timeout=10) == bm.State.STOPPED


def test_machines_write_no_core_files_and_raise_their_open_file_limit():
    with bm.start(bm.Local(), **TIMING) as b:
        m0, = b.start(1, services=SERVICES, timeout=30)
        limits = m0.call("Ledger.limits", timeout=10)
        assert tuple(limits["core"]) == (0, 0)
        soft, hard = limits["nofile"]
        assert soft == hard or hard == resource.RLIM_INFINITY, limits


def test_a_pickled_handle_keeps_its_member_name():
    with bm.start(bm.InProcess(), **TIMING) as b:
        m0, m1 = b.start(2, services=SERVICES, timeout=30)
        assert m0.call("Peer.handle_name", m1, timeout=10) == "m1"
        # an address with the wrong name behind it is refused
        with pytest.raises(bm.AuthError, match="'m1', not 'm0'"):
            m0.call("Peer.dial", m1.addr, "m0", "Ledger.seen", timeout=10)


def test_certificates_renew_before_they_expire():
    """With 4 s certificates, a connection first made at 6 s still authenticates."""
    with bm.start(bm.Local(tls=True), cert_lifetime=4, keepalive_period=0.25,
                  lost_after=5) as b:
        m0, m1, m2 = b.start(3, services=SERVICES, timeout=30)
        first = b.node.tls_contexts
        time.sleep(6.0)
        assert b.node.tls_contexts is not first  # the driver renewed its own
        # m0 -> m1 and m2 -> m0: first connections, made with renewed certificates
        assert m0.call("Peer.call", m1, "Ledger.record", "late", timeout=10) == "late"
        assert m2.call("Peer.call", m0, "Ledger.record", "later", timeout=10) == "later"


def test_plain_tcp_needs_insecure_and_then_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="bigmachine")
    with pytest.raises(bm.Error, match="insecure=True"):
        bm.start(bm.SSH(hosts=["127.0.0.1:1"], tls=False))
    with pytest.raises(bm.Error, match="insecure=True"):
        bm.start(bm.SSH(hosts=["127.0.0.1:1"]), tls=False)
    import bigmachine.backends as backends
    backends._warned_insecure = False
    for _ in range(2):
        bm.start(bm.SSH(hosts=["127.0.0.1:1"]), tls=False, insecure=True).shutdown()
    assert caplog.text.count("insecure=True") == 1, caplog.text
    # Unix-socket systems need no TLS, and keep their default
    bm.start(bm.InProcess()).shutdown()


# ---- admission of strangers ------------------------------------------------------------


def test_admission_drops_the_oldest_stranger_when_full():
    dropped: list = []
    adm = Admission(open_files=64)  # 16 in all, 4 per source
    assert (adm.total, adm.per_source) == (16, 4)
    keys = [adm.admit("10.0.0.1", lambda i=i: dropped.append(("a", i))) for i in range(4)]
    adm.admit("10.0.0.1", lambda: dropped.append(("a", 4)))
    assert dropped == [("a", 0)]  # the oldest of that source made room
    for i in range(12):
        adm.admit(f"10.0.1.{i}", lambda i=i: dropped.append(("b", i)))
    assert len(adm) == 16
    adm.admit("10.0.2.1", lambda: None)  # full: the oldest of all goes
    assert dropped[-1] == ("a", 1) and len(adm) == 16
    adm.done(keys[2])
    assert len(adm) == 15


def test_a_member_dials_in_while_strangers_fill_every_slot():
    """A node whose caps are small: strangers holding all of them do not keep a member out."""
    creds = Credentials.generate()
    server = Node(creds, "server", workers=2)
    server.start_thread()
    root = tempfile.mkdtemp(prefix="bm-adm-")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    strangers: list = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # caps: 16 in all
        try:
            addr = server.run_sync(server.listen(f"unix:{root}/s.sock"), timeout=5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        strangers = [connect(addr) for _ in range(40)]
        client = Node(creds, "client", workers=2)
        client.start_thread()
        try:
            conn = client.connect(addr, timeout=5)
            assert conn.peer_name == "server"
        finally:
            client.close()
        open_ones = 0
        for s in strangers:
            s.settimeout(0.01)
            try:
                if s.recv(1) != b"":
                    open_ones += 1
            except socket.timeout:
                open_ones += 1
            except OSError:
                pass
        assert open_ones <= 16, open_ones  # the rest were dropped, oldest first
    finally:
        for s in strangers:
            s.close()
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def test_keys_load_from_a_pipe_where_there_is_no_memfd(monkeypatch):
    """macOS has no memfd: the key then reaches OpenSSL through a pipe, still no file."""
    from bigmachine._tls import ClusterCA
    import ssl

    seen: list = []
    original = ssl.SSLContext.load_cert_chain

    def observe(self, certfile, keyfile=None, password=None):
        seen.append((certfile, keyfile, os.readlink(keyfile)))
        return original(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", observe)
    monkeypatch.delattr(os, "memfd_create")
    server, client = ClusterCA().issue("probe").contexts()
    assert len(seen) == 2
    for certfile, keyfile, target in seen:
        assert keyfile.startswith("/dev/fd/") and target.startswith("pipe:"), (keyfile, target)
