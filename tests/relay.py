"""A transparent TCP relay on loopback for the security tests: an attacker on the path.

It relays every accepted connection to target() (chosen when the client
connects, so a relay may send a client wherever it likes), records both
directions, and can be armed to rewrite the next chunk it relays to the
server or to slip bytes in front of it.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable, Optional

from tests.rawpeer import connect


class PathRelay:
    def __init__(self, target: Callable[[], str]):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.edit: Optional[Callable[[bytes], bytes]] = None
        self.inject = b""
        self.lock = threading.Lock()
        self.conns: list = []
        self.threads: list = []
        self.errors: list = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def __enter__(self) -> "PathRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def arm(self, edit: Optional[Callable[[bytes], bytes]] = None, inject: bytes = b"") -> None:
        """Rewrite the next chunk relayed to the server with edit; send inject before it."""
        with self.lock:
            self.edit, self.inject = edit, inject

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                upstream = connect(self.target())
            except BaseException as exc:
                self.errors.append(exc)
                client.close()
                continue
            self.conns += [client, upstream]
            for src, dst, log, up in ((client, upstream, self.to_server, True),
                                      (upstream, client, self.to_client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, log, up), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray, up: bool) -> None:
        src.settimeout(None)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    with self.lock:
                        if self.edit is not None:
                            data, self.edit = self.edit(data), None
                        if self.inject:
                            dst.sendall(self.inject)
                            self.inject = b""
                log += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in [self.accepting] + self.threads:
            t.join(5)
        for s in self.conns:
            s.close()
