"""Security (reliability.md 7.2, S1-S8): real machine processes, real loopback sockets.

Two module-scoped sessions serve most tests: ``plain`` (bm.Local(), two
machines; the first carries an audit hook counting unpickling) and ``tlsb``
(bm.Local(tls=True), two machines). Attackers are raw sockets, fake servers
and relays written here, and bigmachine Nodes holding the wrong material.

Every blocking wait has a timeout. Machine output (including the warnings a
machine logs when it refuses a connection) reaches the driver's stderr, where
``capfd`` sees it.
"""
from __future__ import annotations

import ast
import base64
import datetime
import glob
import logging
import os
import pickle
import random
import re
import resource
import selectors
import signal
import socket
import ssl
import statistics
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import contextlib
from contextlib import contextmanager
from typing import Any, Callable, Optional

import numpy as np
import psutil
import pytest

import bigmachine as bm
from bigmachine import _auth, _decoder, _wire
from bigmachine._connection import MAX_IN_FLIGHT
from bigmachine._writer import MAX_QUEUED
from bigmachine._auth import Credentials
from bigmachine._admission import LOG_BURST, LOG_EVERY
from bigmachine._node import Node
from tests.rawpeer import client_handshake, connect, recv_exact
from tests.test_transport import message_bytes
from tests.relay import PathRelay
from bigmachine._tls import ClusterCA, Identity
from tests.conftest import TIMING, _shared_sessions, children, poll, shared, wait_no_leaks
from tests.services import Echo, Relay

pytestmark = pytest.mark.timeout(90)

PACKAGE_DIR = os.path.dirname(os.path.abspath(bm.__file__))
DEADLINE = _auth.HANDSHAKE_TIMEOUT  # 5 s: the server's handshake deadline
FIRST_BYTE = _auth.FIRST_BYTE_TIMEOUT  # 1 s: a silent peer is closed after this


# ---------------------------------------------------------------------------
# Services (machines import them as tests.test_security)
# ---------------------------------------------------------------------------

@bm.service
class AuditProbe:
    """Counts every unpickling in the machine process.

    init installs an audit hook (sys.addaudithook; it cannot be removed, which
    is fine in a throwaway machine) recording each ``pickle.find_class`` event,
    and wraps ``pickle.loads`` (which bigmachine._serialize looks up at call
    time) to count calls. list.append is atomic under the GIL, so concurrent
    calls are counted exactly.
    """

    def init(self, machine):
        finds: list = []
        loads_calls: list = []

        def hook(event, args):
            if event == "pickle.find_class":
                finds.append(f"{args[0]}.{args[1]}")

        sys.addaudithook(hook)
        original = pickle.loads

        def counting_loads(*args, **kwargs):
            loads_calls.append(None)
            return original(*args, **kwargs)

        pickle.loads = counting_loads
        self._finds = finds
        self._loads = loads_calls

    def counts(self):
        """(find_class events, loads calls, the find_class names so far)."""
        finds = list(self._finds)
        return len(finds), len(self._loads), finds


@bm.service
class Spawner:
    """Spawns a child process, as a user's service might."""

    def __init__(self):
        self.children = {}

    def spawn(self):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.children[p.pid] = p
        return p.pid

    def reap(self, pid):
        p = self.children.pop(pid)
        p.kill()
        p.wait(10)
        return p.returncode


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[Optional[float], bytes]:
    """Read until the peer closes; (seconds it took or None if still open, bytes read)."""
    start = time.monotonic()
    got = bytearray()
    while True:
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            return None, bytes(got)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return None, bytes(got)
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start, bytes(got)
        if not chunk:
            return time.monotonic() - start, bytes(got)
        got += chunk


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring a peer that already closed (that is what we hope for)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


class Evil:
    """Unpickling this runs a shell command that creates the canary file."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def malicious_frames(canary: str, sid: int = 1) -> bytes:
    """A well-formed REQUEST message whose pickle would create the canary file."""
    payload = pickle.dumps(Evil(canary), protocol=5)
    assert b"system" in payload
    units, _ = _wire.message_frames(sid, _wire.MTYPE_REQUEST, 0, [payload])
    return b"".join(bytes(buf) for unit in units for buf in unit)


def hello_for(cluster_id: bytes = b"") -> bytes:
    """A correct HELLO (it carries no cluster id: anyone can make one)."""
    return _auth.hello()


def make_node(creds: Credentials, name: str, identity: Optional[Identity] = None,
              listen: bool = False, services: Optional[dict] = None) -> Node:
    node = Node(creds, name, workers=4, identity=identity)
    node.start_thread()
    for sname, inst in (services or {}).items():
        node.registry.add(sname, inst)
    if listen:
        node.run_sync(node.listen(), timeout=5)
    return node


@contextmanager
def nodes(*made: Node):
    try:
        yield made
    finally:
        for n in made:
            n.close()


class Server:
    """A fake server on loopback: each accepted connection runs handler(sock, index)."""

    def __init__(self, handler: Callable[[socket.socket, int], Any], accepts: int = 1):
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(10)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.results: list = []
        self.errors: list = []
        self.thread = threading.Thread(target=self._run, args=(accepts,), daemon=True)
        self.thread.start()

    def _run(self, accepts: int) -> None:
        try:
            for i in range(accepts):
                conn, _ = self.sock.accept()
                with conn:
                    self.results.append(self.handler(conn, i))
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def join(self, timeout: float = 10.0) -> list:
        self.thread.join(timeout)
        self.sock.close()
        assert not self.thread.is_alive(), "fake server still running"
        assert not self.errors, self.errors
        return self.results


class LogWatch:
    """Accumulates what capfd captured (the machines' output reaches our stderr)."""

    def __init__(self, capfd):
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        out, err = self.capfd.readouterr()
        self.text += out + err
        return self.text

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.read()))

    def wait(self, pattern: str, count: int = 1, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = self.count(pattern)
            if n >= count or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def refusals(watch: LogWatch, machine: str = r"\w+") -> int:
    """Connections machine refused, from its log: one by one, then counted per period."""
    text = watch.read()
    one_by_one = len(re.findall(rf"({machine}): WARNING bigmachine\.node: \1: refused connection from",
                                text))
    counted = re.findall(rf"({machine}): WARNING bigmachine\.node: \1: refused (\d+) more", text)
    return one_by_one + sum(int(n) for _, n in counted)


def wait_refusals(watch: LogWatch, machine: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = refusals(watch, machine)
        if n >= count or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def assert_no_connection_registered(node: Node, addr: str) -> None:
    conn = node.connections.get(addr)
    assert conn is None or conn.closed, conn


def vmrss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def pem_file(tmp_path, name: str, data: bytes) -> str:
    path = os.path.join(tmp_path, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def expired_identity(ca: ClusterCA) -> Identity:
    """A certificate signed by the cluster's own CA, but expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
            .issuer_name(ca._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca._key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Identity(ca.ca_pem, cert.public_bytes(serialization.Encoding.PEM), key_pem)


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------

def release(b, allowed: set) -> None:
    """conftest.unshare for a session that may coexist with another module session:
    processes that existed before this session started may outlive it."""
    _shared_sessions.remove(b)
    b.shutdown()
    wait_no_leaks(allowed_pids=allowed & children())


class Session:
    def __init__(self, b, machines, **extra):
        self.b = b
        self.machines = machines
        self.__dict__.update(extra)


@pytest.fixture(scope="module")
def plain():
    """bm.Local(): m0 carries the audit probe (S1), m1 takes the other attacks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # S4 opens 1000 sockets; machines inherit this limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    before = children()
    b = shared(bm.start(bm.Local(), **TIMING))
    try:
        m0, m1 = b.start(2, services={"Probe": AuditProbe(), "Echo": Echo(), "Relay": Relay()},
                         timeout=30)
        yield Session(b, [m0, m1], audit=m0, target=m1)
    finally:
        release(b, before)


@pytest.fixture(scope="module")
def tlsb(tmp_path_factory):
    """bm.Local(tls=True) with two machines, started with TMPDIR pointing at a
    private directory (driver and machines), and every issued Identity recorded."""
    tmpdir = str(tmp_path_factory.mktemp("tls-tmp"))
    issued: list = []
    original_issue = ClusterCA.issue

    def recording_issue(self, *args, **kwargs):
        identity = original_issue(self, *args, **kwargs)
        issued.append(identity)
        return identity

    before = children()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClusterCA, "issue", recording_issue)
        mp.setenv("TMPDIR", tmpdir)
        mp.setattr(tempfile, "tempdir", tmpdir)
        b = shared(bm.start(bm.Local(tls=True), **TIMING))
        try:
            t0, t1 = b.start(2, services={"Echo": Echo(), "Relay": Relay(), "Spawner": Spawner()},
                             timeout=30)
        except BaseException:
            release(b, before)
            raise
    try:
        yield Session(b, [t0, t1], tmpdir=tmpdir, issued=issued, ca=b.node.creds.ca)
    finally:
        release(b, before)


# ---------------------------------------------------------------------------
# S1: nothing is unpickled before authentication
# ---------------------------------------------------------------------------

def _fuzz_inputs(rng: random.Random, cluster_id: bytes, canary: str, n: int) -> list[bytes]:
    evil = malicious_frames(canary)
    huge = _wire.encode_header(_wire.KIND_MSG, 0, 1, (1 << 63) - 1)
    seeds = [hello_for(cluster_id), hello_for(os.urandom(16)),
             hello_for(cluster_id) + os.urandom(32) + evil, _auth.MAGIC, evil, bytes(huge),
             b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n"]
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # random bytes of random length
            out.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:  # bit flips in a seed
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 9)):
                if data:
                    j = rng.randrange(len(data))
                    data[j] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
        elif kind == 2:  # truncated or extended seed
            seed = rng.choice(seeds)
            cut = rng.randrange(0, len(seed) + 1)
            out.append(seed[:cut] + (rng.randbytes(rng.randrange(0, 100)) if rng.random() < 0.5 else b""))
        elif kind == 3:  # the magic, then anything (gets past the first-bytes check)
            out.append(_auth.MAGIC + rng.randbytes(rng.randrange(0, 200)))
        else:  # a right-cluster hello with a forged proof and a payload behind it
            tail = rng.choice([evil, bytes(huge), rng.randbytes(64)])
            out.append(hello_for(cluster_id) + rng.randbytes(32) + tail)
    return out


def report(capfd, text: str) -> None:
    """Measured numbers, shown on the terminal even though output is captured."""
    with capfd.disabled():
        print("\n" + text, flush=True)


def test_serialize_unpickles_through_pickle_loads_as_looked_up_at_call_time(monkeypatch):
    """S1's AuditProbe counts a machine's unpickling by wrapping pickle.loads, which
    _serialize looked up at each call. a640e70 binds it once at import
    (_plain_loads): the one-segment message of every request goes around the
    wrapper, the probe counts no loads at all, and S1's calibration ("one loads per
    request") fails."""
    from bigmachine import _serialize
    seen: list = []
    original = pickle.loads

    def counting_loads(*args, **kwargs):
        seen.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(pickle, "loads", counting_loads)
    segments, _ = _serialize.dumps(("Echo.echo", (1,), {}))
    assert len(segments) == 1, "not the one-segment message of a small request"
    assert _serialize.loads(segments) == ("Echo.echo", (1,), {})
    assert len(seen) == 1, "_serialize.loads did not go through pickle.loads"


def test_nothing_is_unpickled_before_authentication(plain, tmp_path, capfd):
    m = plain.audit
    addr = m.addr
    cluster_id = plain.b.node.creds.cluster_id
    canary = str(tmp_path / "canary")
    evil = malicious_frames(canary)
    watch = LogWatch(capfd)

    def counts():
        return m.call("Probe.counts", timeout=10)

    # Calibrate what an authenticated query and an echo cost in find_class / loads.
    fc0, ld0, _ = counts()
    fc1, ld1, _ = counts()
    q_fc, q_ld = fc1 - fc0, ld1 - ld0
    for i in range(20):
        assert m.call("Echo.echo", i, timeout=10) == i
    fc2, ld2, _ = counts()
    e_fc, e_ld = (fc2 - fc1 - q_fc) / 20, (ld2 - ld1 - q_ld) / 20
    assert (q_fc, q_ld, e_fc, e_ld) == (0, 1, 0, 1), "calibration: one loads per request"

    # Authenticated calls keep working throughout (a thread calling in a loop).
    stop = threading.Event()
    good: list = []
    bad: list = []

    def caller():
        i = 0
        while not stop.is_set():
            try:
                assert m.call("Echo.echo", i, timeout=5) == i
                good.append(i)
            except BaseException as exc:
                bad.append(exc)
            i += 1
            time.sleep(0.002)

    # A silent connection: closed at the 1 s first-byte deadline.
    silent_result: list = []

    def silent():
        with connect(addr) as s:
            silent_result.append(wait_closed(s, FIRST_BYTE + 3))

    fc_before, ld_before, names_before = counts()
    threads = [threading.Thread(target=caller), threading.Thread(target=silent)]
    for t in threads:
        t.start()
    attack_conns = 1
    try:
        closes: dict = {}
        after: dict = {}

        def attack(label: str, body: Callable[[socket.socket], None]) -> None:
            """One attacker connection; records seconds from connect to the machine's close."""
            with connect(addr) as s:
                t0 = time.monotonic()
                body(s)
                elapsed, after[label] = wait_closed(s, 2)
                closes[label] = None if elapsed is None else time.monotonic() - t0

        def other_cluster_then_frame(s):
            # A correct HELLO, then the frame where the proof belongs.
            s.sendall(hello_for())
            reply = recv_exact(s, _auth.HELLO_SIZE, timeout=5.0)
            assert cluster_id not in reply, "a stranger learns no cluster id"
            send_quietly(s, evil)

        def wrong_proof_then_frame(s):
            # A correct HELLO, a proof made with a wrong secret, then the frame.
            h = hello_for()
            s.sendall(h)
            reply = recv_exact(s, _auth.HELLO_SIZE, timeout=5.0)
            wrong = Credentials(cluster_id, os.urandom(32))
            send_quietly(s, _auth.client_proof(wrong, h, reply) + evil)

        huge = bytes(_wire.encode_header(_wire.KIND_MSG, 0, 1, (1 << 63) - 1))
        attack("garbage", lambda s: send_quietly(s, os.urandom(1000)))
        attack("other cluster + frame", other_cluster_then_frame)
        attack("wrong proof + frame", wrong_proof_then_frame)
        attack("frame alone", lambda s: send_quietly(s, evil))
        attack("hello + 2^63 header", lambda s: send_quietly(s, hello_for(cluster_id) + bytes(32) + huge))
        assert after["wrong proof + frame"] == b"", "no proof (nor anything) for a wrong proof"
        attack_conns += len(closes)
        slow = {k: v for k, v in closes.items() if v is None or v > 1.0}
        assert not slow, f"connections not closed within 1 s: {slow}"

        # 10 000 random and mutated pre-auth byte strings over fresh connections.
        inputs = _fuzz_inputs(random.Random(1234), cluster_id, canary, 10_000)
        fuzz_times: list = [None] * len(inputs)
        fuzz_errors: list = []

        def fuzz(k: int, nthreads: int) -> None:
            for j in range(k, len(inputs), nthreads):
                try:
                    with connect(addr) as s:
                        t0 = time.monotonic()
                        send_quietly(s, inputs[j])
                        try:
                            s.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        elapsed, _ = wait_closed(s, 2)
                        fuzz_times[j] = None if elapsed is None else time.monotonic() - t0
                except OSError as exc:
                    fuzz_errors.append((j, exc))

        t_fuzz = time.monotonic()
        fuzzers = [threading.Thread(target=fuzz, args=(k, 4)) for k in range(4)]
        for t in fuzzers:
            t.start()
        for t in fuzzers:
            t.join(60)
        fuzz_elapsed = time.monotonic() - t_fuzz
        assert not any(t.is_alive() for t in fuzzers)
        assert not fuzz_errors, fuzz_errors[:5]
        attack_conns += len(inputs)
        open_ones = [j for j, t in enumerate(fuzz_times) if t is None or t > 1.0]
        assert not open_ones, (f"{len(open_ones)} fuzz connections not closed within 1 s, e.g. "
                               f"{[inputs[j][:20] for j in open_ones[:3]]}")
        for t in threads[1:]:
            t.join(DEADLINE + 5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    fc_after, ld_after, names_after = counts()

    assert not bad, bad[:3]
    assert len(good) >= 20, len(good)
    # Every unpickling is accounted for by an authenticated request.
    expected_fc = q_fc + e_fc * len(good)
    expected_ld = q_ld + e_ld * len(good)
    assert names_after[len(names_before):] == []
    assert (fc_after - fc_before, ld_after - ld_before) == (expected_fc, expected_ld)
    assert not os.path.exists(canary)
    # Control: the probe does see the unpickling of an authenticated request.
    assert m.call("Echo.echo", datetime.date(2020, 1, 2), timeout=10) == datetime.date(2020, 1, 2)
    assert "datetime.date" in counts()[2][len(names_after):]
    silent_elapsed, silent_data = silent_result[0]
    assert silent_data == b""
    assert silent_elapsed is not None and FIRST_BYTE - 0.2 <= silent_elapsed <= FIRST_BYTE + 1.0, silent_elapsed
    # Each refused connection was logged by the machine (with AuthError/ProtocolError
    # text), at a bounded rate: LOG_BURST one by one per period, then a count.
    n = wait_refusals(watch, "m0", attack_conns, timeout=2 * LOG_EVERY + 5)
    assert n >= attack_conns, (n, attack_conns)
    one_by_one = watch.count(r"m0: refused connection from")
    periods = (time.monotonic() - t_fuzz) / LOG_EVERY + 2
    assert one_by_one <= LOG_BURST * periods, (one_by_one, periods)
    finished = [t for t in fuzz_times if t is not None]
    report(capfd, f"S1: {len(inputs)} fuzz connections in {fuzz_elapsed:.2f} s, close time max "
          f"{max(finished) * 1e3:.1f} ms median {statistics.median(finished) * 1e3:.2f} ms; "
          f"silent closed after {silent_elapsed:.2f} s; {len(good)} authenticated calls meanwhile")


# ---------------------------------------------------------------------------
# S2: the negative matrix
# ---------------------------------------------------------------------------

def _expect_refused(node: Node, addr: str, exc_type=bm.AuthError,
                    match: Optional[str] = None) -> BaseException:
    t0 = time.monotonic()
    with pytest.raises(exc_type, match=match) as info:
        node.connect(addr, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert_no_connection_registered(node, addr)
    return info.value


def test_wrong_secret_is_refused_both_ways(plain, capfd):
    m = plain.target
    creds = plain.b.node.creds
    watch = LogWatch(capfd)
    before = refusals(watch, "m1")
    # A client that knows the cluster id but not the secret: the machine refuses its
    # proof and closes without proving itself.
    with nodes(make_node(Credentials(creds.cluster_id, os.urandom(32)), "intruder")) as (intruder,):
        err = _expect_refused(intruder, m.addr, match="closed the connection")
        assert m.addr in str(err)
    # The machine closed its side: it logged the refusal.
    assert wait_refusals(watch, "m1", before + 1, timeout=LOG_EVERY + 5) >= before + 1
    # A raw client with a wrong proof: no proof back, closed at once, nothing else sent.
    with connect(m.addr) as s:
        h = hello_for()
        s.sendall(h)
        reply = recv_exact(s, _auth.HELLO_SIZE, timeout=5.0)
        s.sendall(_auth.client_proof(Credentials(creds.cluster_id, os.urandom(32)), h, reply)
                  + malicious_frames("/nonexistent/x"))
        elapsed, data = wait_closed(s, 2)
    assert data == b"" and elapsed is not None and elapsed < 1.0
    assert m.call("Echo.echo", "still fine", timeout=10) == "still fine"


def test_truncated_server_reply_is_refused(plain):
    def half_hello(sock, _):
        hello = recv_exact(sock, _auth.HELLO_SIZE, timeout=5.0)
        sock.sendall(_auth._HELLO.pack(_auth.MAGIC, _auth.VERSION, _auth.PYTHON,
                                       os.urandom(32))[:30])
        return hello

    server = Server(half_hello)
    _expect_refused(plain.b.node, server.addr, match="truncated")
    server.join()


def test_replayed_server_transcript_is_refused(plain):
    m = plain.target
    creds = plain.b.node.creds
    # Session 1: a relay (MITM) in front of the real machine records the server's
    # hello and proof.
    relay = PathRelay(lambda: m.addr)
    with nodes(make_node(creds, "victim")) as (victim,):
        conn = victim.connect(relay.addr, timeout=5)
        assert not conn.closed
    relay.close()
    assert not relay.errors
    size = _auth.HELLO_SIZE + _auth.SERVER_PROOF_HEAD + len(m.name)
    recorded = bytes(relay.to_client[:size])
    assert len(recorded) == size

    # Session 2: a fake server replays it to a new client, whose fresh nonce it cannot match.
    def replay(sock, _):
        hello = recv_exact(sock, _auth.HELLO_SIZE, timeout=5.0)
        sock.sendall(recorded[:_auth.HELLO_SIZE])
        proof = recv_exact(sock, _auth.PROOF_SIZE, timeout=5.0)
        sock.sendall(recorded[_auth.HELLO_SIZE:])
        return hello, proof, wait_closed(sock, 3)

    server = Server(replay)
    _expect_refused(plain.b.node, server.addr, match="does not know the cluster secret")
    (hello, proof, (elapsed, after)), = server.join()
    assert after == b"", "the client sent frames to a replayed transcript"
    assert elapsed is not None and elapsed < 1.0


def test_reflected_hello_is_refused(plain):
    """A fake server echoes the client's own hello back as its server hello."""
    def reflect(sock, _):
        hello = recv_exact(sock, _auth.HELLO_SIZE, timeout=5.0)
        sock.sendall(hello)
        proof = recv_exact(sock, _auth.PROOF_SIZE, timeout=5.0)
        sock.sendall(proof + b"\x00")  # the client's own proof as ours, with no name
        return wait_closed(sock, 3)

    server = Server(reflect)
    _expect_refused(plain.b.node, server.addr)
    (elapsed, after), = server.join()
    assert after == b"" and elapsed is not None and elapsed < 1.0


@pytest.mark.parametrize("which", ["plain", "tls"])
def test_handshake_reflected_back_to_the_dialer_is_refused(which, plain, tlsb):
    """Reflection proper: a machine dials an attacker, who connects back to that
    machine's own listener and relays bytes between the two. The machine must
    not end up authenticated to itself (the attacker knows no secret; without
    TLS it could then inject frames into an authenticated connection)."""
    victim = (plain if which == "plain" else tlsb).machines[1]
    relay = PathRelay(lambda: victim.addr)
    try:
        result = victim.call("Relay.via_addr", relay.addr, "Echo.echo", "reflected", timeout=10)
    except bm.AuthError:
        pass
    else:
        pytest.fail(f"{victim.name} authenticated to itself through a relay that knows no secret "
                    f"(its call to {relay.addr} was served by itself and returned {result!r})")
    finally:
        relay.close()


def test_hello_from_another_cluster_is_refused(plain):
    m = plain.target
    # A Node of another cluster: its proof fails, the machine closes without proving itself.
    with nodes(make_node(Credentials.generate(), "stranger")) as (stranger,):
        _expect_refused(stranger, m.addr, match="closed the connection")
    # Raw: the machine answers a hello with its versions and a nonce only (no cluster id,
    # no name, no MAC), and closes at a wrong proof.
    with connect(m.addr) as s:
        h = hello_for()
        s.sendall(h)
        reply = recv_exact(s, _auth.HELLO_SIZE, timeout=5.0)
        s.sendall(os.urandom(_auth.PROOF_SIZE))
        elapsed, data = wait_closed(s, 2)
    assert elapsed is not None and elapsed < 1.0 and data == b""
    assert reply[:8] == _auth.MAGIC and plain.b.node.creds.cluster_id not in reply
    assert m.name.encode() not in reply


def _tls_client_ctx(ca_pem: bytes, identity: Optional[Identity] = None, tmp_path=None,
                    maximum: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem.decode())
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = maximum
    if identity is not None:
        ctx.load_cert_chain(pem_file(tmp_path, "c.pem", identity.cert_pem),
                            pem_file(tmp_path, "k.pem", identity.key_pem))
    return ctx


def _tls_attempt(addr: str, ctx: ssl.SSLContext, payload: bytes) -> tuple[str, bytes, float]:
    """Handshake, send payload, read: (what happened, app data received, seconds)."""
    t0 = time.monotonic()
    raw = connect(addr)
    got = b""
    try:
        s = ctx.wrap_socket(raw, do_handshake_on_connect=False)
        s.settimeout(3)
        try:
            s.do_handshake()
            s.sendall(payload)
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return "closed", got, time.monotonic() - t0
                got += chunk
        except ssl.SSLError as exc:
            return f"ssl error: {exc.reason}", got, time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError) as exc:
            return f"reset: {exc}", got, time.monotonic() - t0
        except socket.timeout:
            return "still open", got, time.monotonic() - t0
    finally:
        raw.close()


def test_tls_client_without_certificate_is_refused(tlsb, capfd):
    m = tlsb.machines[0]
    watch = LogWatch(capfd)
    before = watch.count(r"m0: refused connection from .*TLS")
    what, got, elapsed = _tls_attempt(m.addr, _tls_client_ctx(tlsb.ca.ca_pem),
                                      hello_for(tlsb.b.node.creds.cluster_id))
    # TLS 1.3: the client finishes its side first, then reads the server's alert.
    assert what != "still open" and got == b"", (what, got)
    assert "CERTIFICATE_REQUIRED" in what or what == "closed" or what.startswith("reset"), what
    assert elapsed < 1.0
    assert watch.wait(r"m0: refused connection from .*TLS", before + 1, timeout=5) >= before + 1


def test_tls_below_1_3_is_refused(tlsb, tmp_path, caplog):
    m = tlsb.machines[0]
    ctx = _tls_client_ctx(tlsb.ca.ca_pem, tlsb.ca.issue("old-client"), tmp_path,
                          maximum=ssl.TLSVersion.TLSv1_2)
    what, got, elapsed = _tls_attempt(m.addr, ctx, hello_for(tlsb.b.node.creds.cluster_id))
    assert what.startswith("ssl error") and got == b"", what
    assert "VERSION" in what, what  # e.g. TLSV1_ALERT_PROTOCOL_VERSION
    assert elapsed < 1.0
    # The refusal reaches the driver as the machine's log record (counted there, not
    # on our stderr, which lagged past the wait under load, as in the test below).
    refused = re.compile(r"m0: refused connection from .*UNSUPPORTED_PROTOCOL")
    poll(lambda: any(refused.search(r.getMessage()) for r in caplog.records), timeout=10)


def test_tls_client_with_foreign_or_expired_certificate_is_refused(tlsb, caplog):
    m = tlsb.machines[0]
    creds = tlsb.b.node.creds
    foreign = ClusterCA().issue("foreign")
    # Trusts the real CA (so it accepts the machine), presents another cluster's certificate.
    as_member = Identity(tlsb.ca.ca_pem, foreign.cert_pem, foreign.key_pem)
    for identity in (as_member, expired_identity(tlsb.ca)):
        with nodes(make_node(creds, "intruder", identity=identity)) as (intruder,):
            _expect_refused(intruder, m.addr)
    # Both refusals reach the driver as the machine's log records. (Counted
    # there, not in our stderr: under load the second line was seen in the
    # records but not yet on stderr within the wait, 1 run in ~20.)
    refused = re.compile(r"m0: refused connection from .*TLS")
    poll(lambda: sum(bool(refused.search(r.getMessage())) for r in caplog.records) >= 2,
         timeout=10)


def test_machine_impersonation_with_foreign_certificate_is_refused(tlsb, caplog):
    """A 'machine' with the right secret but another CA's certificate: the driver refuses it."""
    creds = tlsb.b.node.creds
    foreign = ClusterCA().issue("impostor")
    # The impostor even trusts the real CA, and knows the cluster secret.
    impostor_id = Identity(tlsb.ca.ca_pem, foreign.cert_pem, foreign.key_pem)
    echo = Echo()
    with nodes(make_node(creds, "impostor", identity=impostor_id, listen=True,
                         services={"Echo": echo})) as (impostor,):
        err = _expect_refused(tlsb.b.node, impostor.addr, match="TLS")
        assert impostor.addr in str(err)
        with pytest.raises(bm.AuthError):
            tlsb.b.dial(impostor.addr).call("Echo.record", "reached", True, timeout=5)
        poll(lambda: "impostor: refused connection" in caplog.text, timeout=5)
    assert echo.events == {}


# ---------------------------------------------------------------------------
# S3: two clusters on one host
# ---------------------------------------------------------------------------

def test_two_clusters_never_cross(plain):
    a = plain.target
    with bm.start(bm.Local(), **TIMING) as other:
        b_m, = other.start(1, services={"Echo": Echo(), "Relay": Relay()}, timeout=30)
        attempts = 0
        for _ in range(3):
            with pytest.raises(bm.AuthError):  # machine of A -> machine of B
                a.call("Relay.via_addr", b_m.addr, "Echo.record", "crossed", True, timeout=10)
            with pytest.raises(bm.AuthError):  # machine of B -> machine of A
                b_m.call("Relay.via_addr", a.addr, "Echo.record", "crossed", True, timeout=10)
            with pytest.raises(bm.AuthError):  # driver of A -> machine of B
                plain.b.dial(b_m.addr).call("Echo.record", "crossed", True, timeout=5)
            with pytest.raises(bm.AuthError):  # driver of B -> machine of A
                other.dial(a.addr).call("Echo.record", "crossed", True, timeout=5)
            attempts += 4
        assert b_m.call("Echo.event", "crossed", timeout=10) is None
        assert a.call("Echo.event", "crossed", timeout=10) is None
        # Each cluster still works within itself.
        assert a.call("Relay.via_addr", plain.audit.addr, "Echo.echo", 1, timeout=10) == 1
        assert b_m.call("Echo.echo", 2, timeout=10) == 2
    assert attempts == 12


# ---------------------------------------------------------------------------
# S4: pre-auth resource limits
# ---------------------------------------------------------------------------

def tls_client_hello() -> bytes:
    """The first flight of a TLS 1.3 client: a ClientHello record."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[0] == 0x16  # a handshake record
    return data


@pytest.mark.parametrize("which", ["plain", "tls"])
def test_idle_flood_and_slowloris_are_closed_at_the_deadline(which, plain, tlsb, capfd):
    m = plain.target if which == "plain" else tlsb.machines[1]
    # The slowloris sends a valid-looking first flight, so it is not refused on its first bytes.
    slow_data = (hello_for(plain.b.node.creds.cluster_id) if which == "plain"
                 else tls_client_hello())
    pid = m.info()["pid"]
    proc = psutil.Process(pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    if soft < 2048:
        proc.rlimit(psutil.RLIMIT_NOFILE, (min(4096, hard), hard))

    def timed_call() -> float:
        t0 = time.perf_counter()
        assert m.call("Echo.echo", b"x" * 64, timeout=5) == b"x" * 64
        return time.perf_counter() - t0

    def calls(out: list, done: threading.Event) -> None:
        # The same pattern before and during the flood: a call, then 1 ms of rest.
        while not done.is_set():
            out.append(timed_call())
            time.sleep(0.001)

    for _ in range(50):
        timed_call()
    baseline: list = []
    base_done = threading.Event()
    base_thread = threading.Thread(target=calls, args=(baseline, base_done))
    base_thread.start()
    time.sleep(1.5)
    base_done.set()
    base_thread.join(10)
    rss_before = vmrss(pid)

    # The slowloris: a valid-looking prefix, 1 byte per second.
    slow_result: list = []

    def slowloris():
        with connect(m.addr) as s:
            t0 = time.monotonic()
            for byte in slow_data:
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                r, _, _ = select_readable(s, 1.0)
                if r:
                    break
            elapsed, _ = wait_closed(s, max(0.1, DEADLINE + 3 - (time.monotonic() - t0)))
            slow_result.append(None if elapsed is None else time.monotonic() - t0)

    slow = threading.Thread(target=slowloris)
    slow.start()

    # 1000 idle unauthenticated connections.
    sel = selectors.DefaultSelector()
    opened = {}
    closed_after = {}
    t_flood = time.monotonic()
    socks = []
    try:
        for _ in range(1000):
            s = connect(m.addr)
            s.setblocking(False)
            opened[s.fileno()] = time.monotonic()
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        t_open = time.monotonic() - t_flood

        # During the flood: calls from an authenticated client, and the machine's RSS.
        during: list = []
        rss_peak = [rss_before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss_peak[0] = max(rss_peak[0], vmrss(pid))
                time.sleep(0.05)

        helpers = [threading.Thread(target=calls, args=(during, done)),
                   threading.Thread(target=sample)]
        for t in helpers:
            t.start()
        try:
            deadline = time.monotonic() + DEADLINE + 4
            while len(closed_after) < len(socks) and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.2):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data == b"":
                        closed_after[s.fileno()] = time.monotonic() - opened[s.fileno()]
                        sel.unregister(s)
        finally:
            done.set()
            for t in helpers:
                t.join(10)
    finally:
        sel.close()
        for s in socks:
            s.close()
        slow.join(DEADLINE + 6)

    assert len(closed_after) == 1000, f"{1000 - len(closed_after)} idle connections still open"
    times = sorted(closed_after.values())  # idle: closed at the first-byte deadline
    assert FIRST_BYTE - 0.5 <= times[0] and times[-1] <= FIRST_BYTE + 2, (times[0], times[-1])
    assert slow_result and slow_result[0] is not None, "slowloris never closed"
    assert DEADLINE - 1 <= slow_result[0] <= DEADLINE + 1, slow_result
    growth = rss_peak[0] - rss_before
    assert growth < 50 << 20, f"RSS grew {growth / 2**20:.1f} MiB"
    base_med, flood_med = statistics.median(baseline), statistics.median(during)
    # Medians, not p99: on 2 cores shared with other test runs single calls are
    # noisy (p99 swings 1-10 ms either way), and 1000 handshake timeouts firing
    # together briefly delay the machine, which moves a tail, not a median. The
    # baseline uses the same call-then-rest pattern as the calls during the flood
    # (back-to-back calls are ~2x faster than spaced ones: warm caches, no wakeups).
    # The baseline median is 0.05-0.45 ms depending on load; 0.25 ms absolute
    # slack absorbs that scheduler noise without hiding a real stall.
    assert flood_med <= 2 * base_med + 0.25e-3, (base_med, flood_med)
    report(capfd, f"S4 {which}: 1000 idle opened in {t_open:.2f} s, closed after {times[0]:.2f}-{times[-1]:.2f} s; "
          f"slowloris closed after {slow_result[0]:.2f} s; RSS growth {growth / 2**20:.2f} MiB; "
          f"call median {base_med * 1e6:.0f} us baseline vs {flood_med * 1e6:.0f} us during "
          f"({len(during)} calls, p99 {np.percentile(during, 99) * 1e6:.0f} us vs "
          f"{np.percentile(baseline, 99) * 1e6:.0f} us)")


def _connects(node: Node, addr: str) -> bool:
    try:
        node.connect(addr, timeout=2)
        return True
    except (bm.AuthError, bm.MachineLost, TimeoutError):
        return False


def test_descriptor_exhaustion_by_unauthenticated_peers_does_not_spin(capfd):
    """Unauthenticated peers that exhaust the machine's descriptors must not make its
    accept loop spin (the listener stays readable while accept() fails with EMFILE)."""
    watch = LogWatch(capfd)
    with bm.start(bm.Local(), **TIMING) as b:
        m, = b.start(1, services={"Echo": Echo()}, timeout=30)
        proc = psutil.Process(m.info()["pid"])
        proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 30, proc.rlimit(psutil.RLIMIT_NOFILE)[1]))
        socks = []
        try:
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.monotonic()
            for _ in range(60):  # 30 are accepted and wait for a hello; the rest wait in the backlog
                socks.append(connect(m.addr))
            time.sleep(1.5)
            window = time.monotonic() - t0
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            assert m.call("Echo.echo", 1, timeout=5) == 1  # the owner's connection still works
        finally:
            for sock in socks:
                sock.close()
        with nodes(make_node(b.node.creds, "late")) as (late,):  # the machine recovers
            poll(lambda: _connects(late, m.addr), timeout=10)
    failures = watch.count(r"accept failed")  # after shutdown: all its output has arrived
    assert failures <= 20, f"{failures} 'accept failed' warnings in {window:.1f} s: the accept loop spins"
    assert cpu < 0.5 * window, f"the machine burnt {cpu:.2f} s of CPU in {window:.1f} s"


def select_readable(sock: socket.socket, timeout: float):
    import select
    return select.select([sock], [], [], timeout)


# ---------------------------------------------------------------------------
# S5: secret hygiene
# ---------------------------------------------------------------------------

def _secret_forms(tlsb, plain) -> dict:
    """Every secret of both clusters, in the encodings a careless logger might use."""
    forms = {}
    for label, secret in (("tls cluster", tlsb.b.node.creds.secret),
                          ("plain cluster", plain.b.node.creds.secret)):
        forms.update({f"{label} raw secret": secret, f"{label} hex secret": secret.hex().encode(),
                      f"{label} HEX secret": secret.hex().upper().encode(),
                      f"{label} base64 secret": base64.b64encode(secret),
                      f"{label} urlsafe secret": base64.urlsafe_b64encode(secret)})
    from cryptography.hazmat.primitives import serialization as ser
    ca_key = tlsb.ca._key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    for i, pem in enumerate([ca_key] + [ident.key_pem for ident in tlsb.issued]):
        forms[f"key {i}"] = pem
        body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
        for j, line in enumerate(body):
            forms[f"key {i} line {j}"] = line
    forms["PRIVATE KEY"] = b"PRIVATE KEY"
    return forms


def _leaks(blob: bytes, forms: dict) -> list:
    return [name for name, value in forms.items() if value in blob]


def test_secrets_never_leak(tlsb, plain, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    watch = LogWatch(capfd)
    b = tlsb.b
    assert len(tlsb.issued) == 3  # the driver's identity and one per machine
    forms = _secret_forms(tlsb, plain)

    # Refused handshakes, logged on both sides: a wrong-secret member, a foreign cert,
    # and a driver dialing a server that fails the handshake.
    errors = []
    with nodes(make_node(Credentials(b.node.creds.cluster_id, os.urandom(32)), "wrongsecret",
                         identity=tlsb.ca.issue("wrongsecret"))) as (n1,):
        errors.append(_expect_refused(n1, tlsb.machines[0].addr))
    foreign = ClusterCA().issue("foreign")
    with nodes(make_node(b.node.creds, "foreign",
                         identity=Identity(tlsb.ca.ca_pem, foreign.cert_pem, foreign.key_pem))) as (n2,):
        errors.append(_expect_refused(n2, tlsb.machines[1].addr))
    server = Server(lambda sock, _: sock.sendall(os.urandom(200)))
    errors.append(_expect_refused(b.node, server.addr, Exception))
    server.join()
    with pytest.raises(bm.AuthError) as info:
        plain.b.dial(tlsb.machines[0].addr).call("Echo.echo", 1, timeout=5)  # plain -> TLS
    errors.append(info.value)
    assert wait_refusals(watch, r"\w+", 3, timeout=LOG_EVERY + 5) >= 3

    # Exception text, reprs and tracebacks.
    texts = []
    for err in errors:
        texts += [str(err), repr(err), "".join(traceback.format_exception(err))]
    texts += [repr(b.node.creds), str(b.node.creds), repr(plain.b.node.creds), repr(tlsb.ca)]
    texts += [repr(ident) for ident in tlsb.issued] + [str(ident) for ident in tlsb.issued]
    for text in texts:
        assert not _leaks(text.encode(), forms), (text, _leaks(text.encode(), forms))

    # /proc of the driver, the machines, and a child a service spawned.
    pids = {"driver": os.getpid()}
    for m in tlsb.machines + plain.machines:
        pids[f"{m.name} of {m.addr}"] = m.info()["pid"]
    tls_pids = {m.info()["pid"] for m in tlsb.machines}
    child = tlsb.machines[0].call("Spawner.spawn", timeout=10)
    pids["service child"] = child
    try:
        assert psutil.Process(child).ppid() == tlsb.machines[0].info()["pid"]
        for who, pid in pids.items():
            for what in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    blob = f.read()
                assert blob, (who, what)
                if what == "environ" and pid in tls_pids:  # the fixture's private TMPDIR
                    assert f"TMPDIR={tlsb.tmpdir}".encode() in blob.split(b"\0")
                assert not _leaks(blob, forms), (who, what, _leaks(blob, forms))
    finally:
        tlsb.machines[0].call("Spawner.reap", child, timeout=10)

    # Everything logged: the driver's records and all machine output seen so far.
    logged = watch.read() + caplog.text
    assert "refused connection" in logged
    assert not _leaks(logged.encode(), forms), _leaks(logged.encode(), forms)

    # No key file left behind by starting the TLS cluster (driver and machines
    # used tlsb.tmpdir as their temporary directory).
    left = []
    for root, dirs, files in os.walk(tlsb.tmpdir):
        left += [os.path.join(root, d) for d in dirs if d.startswith("bigmachine-tls-")]
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if b"PRIVATE KEY" in f.read():
                    left.append(os.path.join(root, name))
    assert not left, left


_CRASHING_DRIVER = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
import bigmachine as bm
from tests.services import Echo
b = bm.start(bm.Local(), keepalive_period=0.25, lost_after=5.0)
m, = b.start(1, services={"Echo": Echo()}, timeout=30)
assert m.call("Echo.echo", 1, timeout=10) == 1
print(b.node.creds.secret.hex(), *resource.getrlimit(resource.RLIMIT_CORE), flush=True)
os.abort()  # a crash, as a segfault in an extension would be
"""


def test_a_crashing_driver_writes_no_core_file(tmp_path):
    """The driver holds the cluster's secret (and with TLS the CA's key): once a
    session starts its soft core limit is 0, whatever its user had set; the hard
    limit is left for the user to raise it again knowingly."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, "-c", _CRASHING_DRIVER], cwd=tmp_path, env=env,
                          capture_output=True, timeout=90)
    assert done.returncode == -signal.SIGABRT, done.stderr[-2000:]
    secret, soft, hard = done.stdout.split()[-3:]
    assert (int(soft), int(hard)) == (0, resource.RLIM_INFINITY)
    holding = []
    for name in os.listdir(tmp_path):  # where core_pattern is "core" (else piped, and refused too)
        with open(tmp_path / name, "rb") as f:
            if bytes.fromhex(secret.decode()) in f.read():
                holding.append(name)
    assert not holding, f"the driver's core file holds the cluster secret: {holding}"


def test_no_key_file_is_ever_written():
    """TLS keys are loaded from anonymous memory files: starting a TLS cluster (driver
    and in-process machines, which load keys as every machine does) opens no file
    for writing and hands OpenSSL only /proc/self/fd paths of memfds."""
    watching = threading.Event()
    writes: list = []
    loaded: list = []

    def audit(event, args):
        if not watching.is_set():
            return
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            path, mode = str(args[0]), args[1]
            flags = args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append(path)
        elif event == "os.mkdir":
            writes.append(str(args[0]))

    original = ssl.SSLContext.load_cert_chain

    def observe(self, certfile, keyfile=None, password=None):
        for path in (certfile, keyfile):
            loaded.append((path, os.readlink(path)))
        return original(self, certfile, keyfile, password)

    sys.addaudithook(audit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssl.SSLContext, "load_cert_chain", observe)
        watching.set()
        try:
            with bm.start(bm.InProcess(tls=True), **TIMING) as b:
                m0, m1 = b.start(2, services={"Echo": Echo(), "Relay": Relay()}, timeout=30)
                assert m0.call("Relay.via_handle", m1, "Echo.echo", 3, timeout=10) == 3
        finally:
            watching.clear()
    assert len(loaded) >= 2 * 3  # server and client context of the driver and each machine
    for path, target in loaded:
        assert path.startswith("/proc/self/fd/"), path
        assert target.startswith("/memfd:bigmachine-tls"), target
    files = [p for p in writes if not p.startswith("/proc/self/fd/") and not p.endswith(".sock")]
    assert not files, files
    server_ctx, client_ctx = ClusterCA().issue("probe").contexts()
    for ctx in (server_ctx, client_ctx):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        cas = ctx.get_ca_certs()  # the trust store is the cluster CA only
        assert len(cas) == 1 and cas[0]["subject"] == ((("commonName", "bigmachine cluster CA"),),)


# ---------------------------------------------------------------------------
# S6: bind addresses
# ---------------------------------------------------------------------------

def test_machines_listen_on_loopback_only(plain, tlsb):
    """Local machines listen on Unix sockets only (no TCP port at all); with TLS, on
    loopback TCP only. The driver listens on nothing that leaves the host."""
    for m in plain.machines + tlsb.machines:
        pid = m.info()["pid"]
        inet = [c.laddr for c in psutil.Process(pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN]
        if m in plain.machines:
            assert inet == [], (m, inet)
            assert m.addr.startswith("unix:/")
            path = m.addr[5:]
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        else:
            assert inet and all(l.ip == "127.0.0.1" for l in inet), (m, inet)
            assert m.addr.startswith("127.0.0.1:")
    driver = [c.laddr for c in psutil.Process().net_connections(kind="inet")
              if c.status == psutil.CONN_LISTEN]
    assert all(l.ip in ("127.0.0.1", "::1") for l in driver), driver


# ---------------------------------------------------------------------------
# S8: constant-time comparison of secrets
# ---------------------------------------------------------------------------

SECRET_WORDS = {"mac", "macs", "digest", "hexdigest", "secret", "proof", "hmac", "token",
                "nonce", "signature", "sig", "expect", "expected"}


def _words(name: str) -> set:
    parts = re.split(r"_+|(?<=[a-z])(?=[A-Z])", name)
    return {p.lower() for p in parts if p}


def _suspicious_compares(source: str, filename: str) -> list:
    found = []
    if filename.endswith(".py"):
        tree = ast.parse(source, filename)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                continue
            names = set()
            for part in [node.left] + node.comparators:
                for sub in ast.walk(part):
                    if isinstance(sub, ast.Name):
                        names |= _words(sub.id)
                    elif isinstance(sub, ast.Attribute):
                        names |= _words(sub.attr)
            if names & SECRET_WORDS:
                found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    else:  # Cython: line by line
        for lineno, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            if "==" in code or "!=" in code:
                words = set()
                for ident in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code):
                    words |= _words(ident)
                if words & SECRET_WORDS:
                    found.append(f"{filename}:{lineno}: {line.strip()}")
    return found


def test_secret_comparisons_are_constant_time():
    # The checker itself catches the pattern it looks for.
    assert _suspicious_compares("if mac == expected_mac:\n    pass\n", "x.py")
    assert _suspicious_compares("ok = proof != self.proof\n", "x.py")
    assert _suspicious_compares("if digest == other: pass\n", "x.pyx")
    assert not _suspicious_compares("ok = hmac.compare_digest(mac, proof)\n", "x.py")
    files = sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(PACKAGE_DIR, "**", "*.pyx"), recursive=True))
    assert any(f.endswith("_auth.py") for f in files)
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            found += _suspicious_compares(f.read(), os.path.relpath(path, PACKAGE_DIR))
    assert not found, "\n".join(found)
    with open(os.path.join(PACKAGE_DIR, "_auth.py"), encoding="utf-8") as f:
        auth = f.read()
    assert auth.count("hmac.compare_digest(") >= 3  # cluster id, server MAC, client proof


# ---------------------------------------------------------------------------
# TLS works: calls, arrays, machine to machine
# ---------------------------------------------------------------------------

def test_tls_cluster_works(tlsb):
    t0, t1 = tlsb.machines
    assert t0.call("Echo.echo", {"a": [1, 2]}, timeout=10) == {"a": [1, 2]}
    conn = t0.connection(10)
    assert conn.tls is not None and conn.tls.obj.version() == "TLSv1.3"
    arr = np.arange(1 << 20, dtype=np.float64)
    back = t1.call("Echo.echo", arr, timeout=30)
    assert isinstance(back, np.ndarray) and np.array_equal(back, arr)
    assert t0.call("Relay.via_addr", t1.addr, "Echo.echo", "m2m", timeout=10) == "m2m"
    assert t1.call("Relay.via_handle", t0, "Echo.get_tag", timeout=10) == "echo"
    assert [x for x in t0.stream("Echo.count", 5, timeout=10)] == [0, 1, 2, 3, 4]
    # A plaintext bigmachine hello to a TLS machine gets nothing back but a close.
    with connect(t0.addr) as s:
        s.sendall(hello_for(tlsb.b.node.creds.cluster_id))
        elapsed, data = wait_closed(s, 2)
    assert elapsed is not None and elapsed < 1.0
    assert _auth.MAGIC not in data


# ---------------------------------------------------------------------------
# S6: what a member that does not read can make us hold
# ---------------------------------------------------------------------------

MiB = 1 << 20


@pytest.fixture
def lone():
    """A fresh bm.Local() session with one machine (its memory is measured)."""
    with bm.start(bm.Local(), **TIMING) as b:
        m, = b.start(1, services={"Echo": Echo()}, timeout=30)
        yield b, m


def _raw_member(b, m) -> socket.socket:
    """A raw socket through the handshake to m, that reads only when told."""
    sock = connect(m.addr)
    client_handshake(sock, b.node.creds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def _requests(sids, method: str, *args) -> bytes:
    return b"".join(message_bytes(sid, _wire.MTYPE_REQUEST, (method, args, {})) for sid in sids)


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.timeout(90)
def test_pings_of_a_member_that_never_reads_do_not_pile_up(lone):
    """A PONG is queued only when nothing else waits: 2 M PINGs (46 MiB) from a
    peer that reads nothing grew the machine by ~600 MiB before."""
    b, m = lone
    pid = m.info()["pid"]
    sock = _raw_member(b, m)
    try:
        batch = _wire.control_frame(_wire.KIND_PING, 0, 1) * 40_000
        rss = _rss(pid)
        sock.settimeout(30)
        with contextlib.suppress(OSError):
            for _ in range(50):
                sock.sendall(batch)
        time.sleep(1.0)
        growth = _rss(pid) - rss
    finally:
        sock.close()
    assert growth <= 32 * MiB, f"the machine grew by {growth / MiB:.0f} MiB"
    assert m.call("Echo.echo", 1, timeout=10) == 1


@pytest.mark.timeout(90)
def test_replies_to_a_member_that_reads_late_wait_to_be_made_and_none_is_lost(lone):
    """3,000 requests of ~100 bytes for 60 KB replies (small messages, which never
    wait for room): once max_queued bytes wait for the peer, its calls wait to
    run, so the machine holds about max_queued, not 180 MB; when the peer
    reads again every call is answered."""
    b, m = lone
    pid = m.info()["pid"]
    sock = _raw_member(b, m)
    try:
        sids = range(1, 2 * 3000, 2)
        rss = _rss(pid)
        sock.settimeout(10)
        sock.sendall(_requests(sids, "Echo.blob", 60_000))
        time.sleep(3.0)
        growth = _rss(pid) - rss
        assert growth <= MAX_QUEUED + 64 * MiB, f"the machine grew by {growth / MiB:.0f} MiB"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        decoder = _decoder.Decoder()
        answered = set()
        deadline = time.monotonic() + 60
        while len(answered) < len(sids):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(1 << 20)
            assert data, f"closed after {len(answered)} replies"
            answered.update(event[1] for event in decoder.feed(data)
                            if event[0] == _wire.KIND_MSG and event[2] == _wire.MTYPE_REPLY)
    finally:
        sock.close()
    assert answered == set(sids)
    assert m.call("Echo.echo", 1, timeout=10) == 1


@pytest.mark.timeout(90)
def test_a_member_with_more_calls_in_flight_than_its_gate_allows_is_cut_off(lone):
    """A member's own gate lets out at most max_in_flight calls: one more in
    flight at once is a protocol error, which closes that connection only."""
    b, m = lone
    sock = _raw_member(b, m)
    try:
        sids = range(1, 2 * (MAX_IN_FLIGHT + 1), 2)
        sock.settimeout(30)
        with contextlib.suppress(OSError):  # the machine may close before the last is sent
            sock.sendall(_requests(sids, "Echo.wait_cancel", "cut", 20.0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        deadline = time.monotonic() + 30
        closed = False
        while not closed and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                closed = sock.recv(1 << 20) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                pass
    finally:
        sock.close()
    assert closed, "the machine kept serving a member past its in-flight limit"
    assert m.call("Echo.echo", 1, timeout=10) == 1
