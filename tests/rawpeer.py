"""Raw-socket helpers shared by tests that speak the wire protocol by hand."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Optional

import bigmachine as bm
from bigmachine import _decoder, _wire
from bigmachine._connection import Connection
from bigmachine._serialize import dumps, loads


def recv_exact(sock: socket.socket, n: int, timeout: Optional[float] = None) -> bytes:
    """Read exactly n bytes; with timeout, set it on the socket first."""
    if timeout is not None:
        sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def connect(addr: str, timeout: float = 5.0) -> socket.socket:
    """A blocking socket connected to addr ("host:port" or "unix:/path")."""
    if addr.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr[5:])
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def client_handshake(sock: socket.socket, creds, expect: Optional[str] = None) -> str:
    """Pass the dialler's side of the handshake by hand; return the server's name."""
    from bigmachine import _auth

    mine = _auth.hello()
    sock.sendall(mine)
    theirs = recv_exact(sock, _auth.HELLO_SIZE)
    _auth.check_versions("peer", theirs)
    sock.sendall(_auth.client_proof(creds, mine, theirs))
    head = recv_exact(sock, _auth.SERVER_PROOF_HEAD)
    name = recv_exact(sock, head[-1]) if head[-1] else b""
    return _auth.check_server_proof(creds, "peer", mine, theirs, head[:-1], name, expect)


def server_handshake(sock: socket.socket, creds, name: str = "raw") -> None:
    """Pass the server's side of the handshake by hand (asserting the client's proof)."""
    from bigmachine import _auth

    theirs = recv_exact(sock, _auth.HELLO_SIZE)
    mine = _auth.hello()
    sock.sendall(mine)
    proof = recv_exact(sock, _auth.PROOF_SIZE)
    assert _auth.check_client_proof(creds, theirs, mine, proof)
    sock.sendall(_auth.server_proof(creds, theirs, mine, name))


# ---- a real Connection whose peer is a raw socket the test drives ------------------


class RawPeer:
    """The far end of a socketpair, speaking the wire protocol by hand: it answers
    requests with their argument while `reading` is set, and reads nothing otherwise."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reading = threading.Event()
        self.reading.set()
        self.stop = False
        self.decoder = _decoder.Decoder()
        self.thread = threading.Thread(target=self._run, daemon=True, name="review-rawpeer")
        self.thread.start()

    def send(self, sid: int, mtype: int, value) -> None:
        units, _ = _wire.message_frames(sid, mtype, 0, *dumps(value))
        for unit in units:
            self.sock.sendall(b"".join(bytes(memoryview(b)) for b in unit))

    def _run(self) -> None:
        while not self.stop:
            if not self.reading.wait(0.05):
                continue
            try:
                n = self.sock.recv_into(self.decoder.get_buffer())
            except OSError:
                return
            if n == 0:
                return
            for event in self.decoder.buffer_updated(n):
                if event[0] == _wire.KIND_MSG and event[2] == _wire.MTYPE_REQUEST and event[1] & 1:
                    method, args, kwargs = loads(event[4])
                    if method == "echo":
                        self.send(event[1], _wire.MTYPE_REPLY, args[0])


@contextlib.contextmanager
def raw_connection(**kwargs):
    """(conn, peer, requests): our Connection on its own IO loop, the raw peer, and the
    requests the peer made of us (sid, segments), in arrival order."""
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True, name="review-loop")
    loop_thread.start()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    requests: list = []

    async def make():
        return Connection(ours, loop, "rawpeer", True,
                          lambda conn, sid, mflags, segments: requests.append(sid),
                          lambda conn: None, **kwargs)

    conn = asyncio.run_coroutine_threadsafe(make(), loop).result(5)
    peer = RawPeer(theirs)
    try:
        yield conn, peer, requests
    finally:
        peer.stop = True
        peer.reading.set()
        conn.fail(bm.MachineLost("rawpeer", "test over"))
        theirs.close()
        peer.thread.join(5)
        deadline = time.monotonic() + 5
        while conn.reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
