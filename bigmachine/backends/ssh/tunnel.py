"""The SSH tunnel: a listener on the driver's loopback whose connections are
forwarded to a machine through its host's SSH connection (direct-tcpip)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from ...errors import Error

log = logging.getLogger("bigmachine.ssh")


MAX_CONNECTIONS = 64  # local connections a forwarder serves at once
FIRST_BYTES = 5.0  # seconds a new local connection has to send its first bytes
OPEN_TIMEOUT = 10.0  # seconds to open its SSH channel
REFUSALS_LOGGED_EVERY = 10.0  # seconds between two log lines about refused connections


class Forwarder:
    """A listener on the driver's 127.0.0.1 whose connections are forwarded to
    target ("host:port" as seen from the SSH host) through the SSH connection.

    Any local user can connect to it, so it bounds what they can hold: at most
    max_connections at once, and a connection that has sent nothing within
    first_bytes seconds is closed before an SSH channel is opened for it. When
    full, the oldest connection still silent makes room (a member's dial speaks
    at once), or, if every one has spoken, the new one is refused.
    """

    def __init__(self, client: Any, target: str, label: str,
                 max_connections: int = MAX_CONNECTIONS, first_bytes: float = FIRST_BYTES):
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.client = client
        self.label = label
        self.max_connections = max_connections
        self.first_bytes = first_bytes
        self.closed = False
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()  # local connections being served
        self.silent: list[socket.socket] = []  # those that have sent nothing yet, oldest first
        self.chans: set[Any] = set()
        self.refused = 0
        self._logged = 0.0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True,
                         name=f"bigmachine-ssh-forward-{label}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if self._admit(conn):
                threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                 name=f"bigmachine-ssh-forward-{self.label}").start()

    def _admit(self, conn: socket.socket) -> bool:
        with self.lock:
            if len(self.conns) >= self.max_connections:
                if not self.silent:
                    self.refused += 1
                    self._log_refusal()
                    conn.close()
                    return False
                oldest = self.silent.pop(0)
                self.conns.discard(oldest)
                _shutdown(oldest)  # its thread wakes and gives up
            self.conns.add(conn)
            self.silent.append(conn)
            return True

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - self._logged >= REFUSALS_LOGGED_EVERY:
            self._logged = now
            log.warning("%s: the tunnel refused local connections (%d so far): %d are open",
                        self.label, self.refused, self.max_connections)

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            conn.settimeout(self.first_bytes)
            first = conn.recv(1 << 16)
            conn.settimeout(None)
        except OSError:
            first = b""
        with self.lock:
            if conn in self.silent:
                self.silent.remove(conn)
        if not first:
            self._forget(conn, None)
            return
        transport = self.client.get_transport()
        try:
            if transport is None or not transport.is_active():
                raise Error("the SSH connection is closed")
            chan = transport.open_channel("direct-tcpip", self.target, peer[:2],
                                          timeout=OPEN_TIMEOUT)
        except Exception as exc:  # paramiko's ChannelException, SSHException, OSError
            log.warning("%s: cannot forward a connection to %s:%d: %s", self.label,
                        *self.target, exc)
            self._forget(conn, None)
            return
        with self.lock:
            if self.closed or conn not in self.conns:
                chan.close()
                _shutdown(conn)
                return
            self.chans.add(chan)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def done() -> None:
            self._forget(conn, chan)

        try:
            chan.sendall(first)
        except Exception:  # the channel is gone already
            done()
            return
        threading.Thread(target=_copy, args=(conn.recv, chan.sendall, done), daemon=True,
                         name=f"bigmachine-ssh-forward-{self.label}").start()
        _copy(chan.recv, conn.sendall, done)

    def _forget(self, conn: socket.socket, chan: Any) -> None:
        with self.lock:
            self.conns.discard(conn)
            self.chans.discard(chan)
        _shutdown(conn)
        if chan is not None:
            chan.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns, chans = list(self.conns), list(self.chans)
            self.conns, self.chans, self.silent = set(), set(), []
        _shutdown(self.sock)
        for conn in conns:
            _shutdown(conn)
        for chan in chans:
            chan.close()


def _copy(recv: Any, sendall: Any, done: Any) -> None:
    try:
        while True:
            data = recv(1 << 16)
            if not data:
                break
            sendall(data)
    except Exception:  # OSError, EOFError, paramiko.SSHException: the link is gone
        pass
    finally:
        done()


def _shutdown(sock: socket.socket) -> None:
    """Wake whoever is blocked on sock, then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
