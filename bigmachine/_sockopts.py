"""Socket options of a connection: kernel buffers, latency, and TCP liveness."""
from __future__ import annotations

import socket

# Kernel socket buffers on local links. Left to autotuning they grow to tens
# of MiB on loopback, and a ping queued behind them waits for all of it;
# 1 MiB keeps bulk speed (bench/bulk.py) and bounds that wait. Links with a
# larger bandwidth-delay product (SSH hosts) pass 0: the kernel's autotuning.
SOCKET_BUFFER = 1 << 20
# Seconds a connection's reader busy-polls its socket before it sleeps, while
# its waits are that short (see _sockio.Spin): a sync ping in 22 us, not 80.
# At most this much CPU is spent in vain when the traffic stops. 100 us was
# enough for a sync ping, but one slow wake-up of an acall's event loop (~100
# us here) then made every wait longer than the window, and polling stopped
# for good: an acall ping of 87-200 us instead of 40.
BUSY_POLL = 300e-6


def configure_socket(sock: socket.socket, user_timeout: float, buffer: int = SOCKET_BUFFER) -> None:
    """Low latency, and a bound on how long a silent peer can hold a call.

    buffer: kernel send and receive buffer bytes; 0 leaves them to autotuning.
    """
    if buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    if sock.family == socket.AF_UNIX:
        return  # the rest is TCP's
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(user_timeout / 3)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
