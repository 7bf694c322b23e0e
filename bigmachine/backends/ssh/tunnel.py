"""The SSH tunnel: a listener on the driver's loopback whose connections are
forwarded to a machine through its host's SSH connection (direct-tcpip)."""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from ...errors import Error

log = logging.getLogger("bigmachine.ssh")


class Forwarder:
    """A listener on the driver's 127.0.0.1 whose connections are forwarded to
    target ("host:port" as seen from the SSH host) through the SSH connection."""

    def __init__(self, client: Any, target: str, label: str):
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.client = client
        self.label = label
        self.closed = False
        self.lock = threading.Lock()
        self.open: list[Any] = []  # sockets and channels to close with us
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
            threading.Thread(target=self._connect, args=(conn, peer), daemon=True,
                             name=f"bigmachine-ssh-forward-{self.label}").start()

    def _connect(self, conn: socket.socket, peer: tuple) -> None:
        transport = self.client.get_transport()
        try:
            if transport is None or not transport.is_active():
                raise Error("the SSH connection is closed")
            chan = transport.open_channel("direct-tcpip", self.target, peer[:2], timeout=10)
        except Exception as exc:  # paramiko's ChannelException, SSHException, OSError
            log.warning("%s: cannot forward a connection to %s:%d: %s", self.label,
                        *self.target, exc)
            conn.close()
            return
        with self.lock:
            if self.closed:
                conn.close()
                chan.close()
                return
            self.open += [conn, chan]
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def done() -> None:
            _shutdown(conn)
            chan.close()

        threading.Thread(target=_copy, args=(conn.recv, chan.sendall, done), daemon=True,
                         name=f"bigmachine-ssh-forward-{self.label}").start()
        _copy(chan.recv, conn.sendall, done)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            items, self.open = self.open, []
        _shutdown(self.sock)
        for item in items:
            if isinstance(item, socket.socket):
                _shutdown(item)
            else:
                item.close()


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
