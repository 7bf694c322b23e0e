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
