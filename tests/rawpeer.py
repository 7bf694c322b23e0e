"""Raw-socket helpers shared by tests that speak the wire protocol by hand."""
from __future__ import annotations

import socket
from typing import Optional


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
