"""A relay (loopback TCP, or a Unix socket beside a Unix-socket machine) that breaks the network on demand, for fault tests.

Modelled on asyncpg's ``TCPFuzzingProxy``: real sockets on port 0, one
thread of its own. Each accepted connection is paired with a fresh
connection to the backend and bytes are relayed both ways until told
otherwise:

- ``cut()`` resets every live link at once (RST to both ends), as when a
  NAT entry or a middlebox dies. New connections are relayed as usual.
- ``stall()`` stops relaying, in both directions, on live and new links,
  while every socket stays open: a blackhole. The kernel still ACKs what it
  receives until the proxy's buffers fill, so only application-level
  keepalives (or ``TCP_USER_TIMEOUT`` once windows close) can notice.
- ``restore()`` resumes relaying, including what queued up meanwhile and
  any close that happened behind the stall.
- ``truncate_next(n, direction)`` relays only the first n bytes of the next
  chunk read in that direction, then resets the link: a peer that died in
  the middle of a write.

Every control method takes effect on the relay thread before it returns.
"""
from __future__ import annotations

import itertools
import os
import queue
import selectors
import socket
import struct
import threading
from typing import Callable, Optional

CHUNK = 65536
HIGH_WATER = 1 << 20  # bytes pending towards one side before we stop reading the other

TO_BACKEND = "to_backend"
TO_CLIENT = "to_client"


_serial = itertools.count()


def _reset(sock: socket.socket) -> None:
    """Close sock with a RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Side:
    """One socket of a link and the bytes waiting to be written to it."""

    __slots__ = ("sock", "pending", "eof_in", "shut_out", "events")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = bytearray()  # bytes to write to this socket
        self.eof_in = False          # this socket will send nothing more
        self.shut_out = False        # we have shut down writing to it
        self.events = 0              # what the selector watches it for


class _Link:
    def __init__(self, client: socket.socket, backend: socket.socket):
        self.client = _Side(client)
        self.backend = _Side(backend)
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.backend if side is self.client else self.client

    def direction_from(self, side: _Side) -> str:
        return TO_BACKEND if side is self.client else TO_CLIENT


class FaultProxy:
    """Relay from ``addr`` to ``backend`` ("host:port", or "unix:/path": then addr is a
    Unix socket beside it)."""

    def __init__(self, backend: str, host: str = "127.0.0.1"):
        if backend.startswith("unix:"):  # a Unix-socket machine: relay from a socket beside it
            self.backend = backend[5:]
            self.family = socket.AF_UNIX
            path = f"{self.backend}.proxy{next(_serial)}"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.addr = f"unix:{path}"
        else:
            bhost, _, bport = backend.rpartition(":")
            self.backend = (bhost.strip("[]"), int(bport))
            self.family = socket.AF_INET
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind((host, 0))
            self.addr = f"{host}:{self.listener.getsockname()[1]}"
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.links: list[_Link] = []
        self.stalled = False
        self.refuse_new = False    # reset new connections at once (a firewall closing)
        self.accepted = 0          # connections accepted so far
        self.relayed = {TO_BACKEND: 0, TO_CLIENT: 0}  # bytes
        self._truncate: dict[str, Optional[int]] = {TO_BACKEND: None, TO_CLIENT: None}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._commands: "queue.Queue[tuple[Callable[[], None], threading.Event]]" = queue.Queue()
        self._closed = False
        self._selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._run, daemon=True,
                                         name=f"faultproxy-{self.addr}")
        self._thread.start()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.addr} -> {self.backend}>"

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- control (any thread) ----------------------------------------------

    def cut(self) -> None:
        """Reset every live link (both ends see a connection reset)."""
        self._do(self._cut)

    def stall(self) -> None:
        """Stop relaying in both directions, keeping every socket open."""
        self._do(lambda: setattr(self, "stalled", True))

    def restore(self) -> None:
        """Relay again: after stall(), deliver what queued up; cancel a pending truncation."""
        def restore() -> None:
            self.stalled = False
            self._truncate = {TO_BACKEND: None, TO_CLIENT: None}
        self._do(restore)

    def truncate_next(self, n: int, direction: str = TO_CLIENT) -> None:
        """Relay only n bytes of the next chunk going `direction`, then reset its link."""
        if direction not in (TO_BACKEND, TO_CLIENT):
            raise ValueError(f"direction must be {TO_BACKEND!r} or {TO_CLIENT!r}")
        self._do(lambda: self._truncate.__setitem__(direction, n))

    def live_links(self) -> int:
        box: list = []
        self._do(lambda: box.append(sum(not link.closed for link in self.links)))
        return box[0]

    def close(self) -> None:
        """Reset every link and stop the relay. Idempotent."""
        if self._closed:
            return
        if self._thread.is_alive():
            self._do(self._shutdown)
        else:  # the relay thread died of an error: clean up here
            self._shutdown()
        self._closed = True
        self._thread.join(5)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _do(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        if self._closed or not self._thread.is_alive():
            raise RuntimeError(f"{self!r} is closed")
        done = threading.Event()
        self._commands.put((fn, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise TimeoutError(f"{self!r} did not act within {timeout} s")

    # ---- the relay thread ---------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            self._update_interest()
            for key, mask in self._selector.select(1.0):
                what, ref = key.data
                if what == "accept":
                    self._accept()
                elif what == "wake":
                    self._run_commands()
                else:
                    link, side = ref
                    if link.closed:
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._flush(link, side)
                    if mask & selectors.EVENT_READ and not link.closed:
                        self._read(link, side)
                if self._closed:
                    return

    def _run_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            finally:
                done.set()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.refuse_new:
            self.accepted += 1
            _reset(client)
            return
        try:  # blocking, but on one host a connect succeeds or is refused at once
            backend = socket.socket(self.family, socket.SOCK_STREAM)
            backend.settimeout(5)
            backend.connect(self.backend)
        except OSError:
            backend.close()
            _reset(client)  # the backend is gone: so is the link
            return
        self.accepted += 1
        for sock in (client, backend):
            sock.setblocking(False)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.links.append(_Link(client, backend))  # watched from the next turn of _run

    def _update_interest(self) -> None:
        """Read from a side unless stalled, at EOF or its peer's queue is full; write if queued."""
        for link in self.links:
            if link.closed:
                continue
            if not self.stalled:
                self._finish_half_closes(link)
                if link.closed:
                    continue
            for side in (link.client, link.backend):
                other = link.other(side)
                events = 0
                if not self.stalled:
                    if not side.eof_in and len(other.pending) < HIGH_WATER:
                        events |= selectors.EVENT_READ
                    if side.pending:
                        events |= selectors.EVENT_WRITE
                self._watch(link, side, events)
        self.links = [link for link in self.links if not link.closed]

    def _watch(self, link: _Link, side: _Side, events: int) -> None:
        """Watch side's socket for events (0: not at all; selectors cannot hold 0)."""
        if events == side.events:
            return
        data = ("link", (link, side))
        if side.events == 0:
            self._selector.register(side.sock, events, data)
        elif events == 0:
            self._selector.unregister(side.sock)
        else:
            self._selector.modify(side.sock, events, data)
        side.events = events

    def _read(self, link: _Link, side: _Side) -> None:
        if self.stalled:
            return
        other = link.other(side)
        direction = link.direction_from(side)
        try:
            data = side.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_link(link)
            return
        if not data:
            side.eof_in = True
            return
        limit = self._truncate[direction]
        if limit is not None:
            self._truncate[direction] = None
            try:
                other.sock.setblocking(True)
                other.sock.sendall(bytes(other.pending) + data[:limit])
            except OSError:
                pass
            self._close_link(link)
            return
        self.relayed[direction] += len(data)
        other.pending += data
        self._flush(link, other)

    def _flush(self, link: _Link, side: _Side) -> None:
        if not side.pending or self.stalled:
            return
        try:
            n = side.sock.send(side.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_link(link)
            return
        del side.pending[:n]

    def _finish_half_closes(self, link: _Link) -> None:
        """Pass an EOF on once everything read before it has been delivered."""
        for side in (link.client, link.backend):
            other = link.other(side)
            if side.eof_in and not other.pending and not other.shut_out:
                other.shut_out = True
                try:
                    other.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if link.client.eof_in and link.backend.eof_in and \
                link.client.shut_out and link.backend.shut_out:
            self._close_link(link, reset=False)

    def _close_link(self, link: _Link, reset: bool = True) -> None:
        if link.closed:
            return
        link.closed = True
        for side in (link.client, link.backend):
            self._watch(link, side, 0)
            if reset:
                _reset(side.sock)
            else:
                side.sock.close()

    def _cut(self) -> None:
        for link in self.links:
            self._close_link(link)
        self.links = []

    def _shutdown(self) -> None:
        self._cut()
        try:
            self._selector.unregister(self.listener)
        except KeyError:
            pass
        self.listener.close()
        if self.family == socket.AF_UNIX:
            try:
                os.unlink(self.addr[5:])
            except OSError:
                pass
        self._closed = True
