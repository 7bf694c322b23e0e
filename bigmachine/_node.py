"""A node: one participant in a cluster (the driver, or one machine).

A node owns an IO event loop (on a thread of its own, or the main thread of a
machine process), a thread pool for sync service methods, its service
registry, a listening socket if it serves, and one connection per peer
address. Several nodes may live in one process (``bigmachine.InProcess``);
``current_node()`` finds the one whose thread is asking.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
from typing import Any, Callable, Optional

from . import _auth
from ._auth import Credentials
from ._connection import SOCKET_BUFFER, Connection, configure_socket, mark_loop_thread
from ._dispatch import Dispatcher
from ._pool import Pool
from ._service import Registry
from ._tls import Identity, TLSChannel
from .errors import AuthError, Error, MachineLost, ProtocolError

log = logging.getLogger("bigmachine.node")

_local = threading.local()
_default: Optional["Node"] = None
CONNECT_TIMEOUT = 10.0
MAX_HANDSHAKES = 4096  # unauthenticated connections at once; more are closed at accept
ACCEPT_PAUSE = 0.5     # seconds to stop accepting after accept() fails
USER_TIMEOUT = 15.0  # TCP_USER_TIMEOUT: how long unacknowledged data may sit


def current_node() -> Optional["Node"]:
    """The node of the calling thread, else the process's default (the driver's)."""
    return getattr(_local, "node", None) or _default


def swap_current(node: Optional["Node"]) -> Optional["Node"]:
    """Make node the calling thread's node; return the one it replaces."""
    previous = getattr(_local, "node", None)
    _local.node = node
    return previous


def set_default(node: Optional["Node"]) -> None:
    global _default
    _default = node


class Node:
    """IO loop, thread pool, services and connections of one cluster member."""

    def __init__(self, creds: Credentials, name: str, workers: Optional[int] = None,
                 user_timeout: float = USER_TIMEOUT, identity: Optional[Identity] = None,
                 socket_buffer: int = SOCKET_BUFFER):
        self.creds = creds
        # With an identity, every connection (both ways) is TLS 1.3 with
        # certificates of the cluster CA, and the handshake runs inside it.
        self.tls_contexts = identity.contexts() if identity is not None else None
        self.name = name
        self.user_timeout = user_timeout
        self.socket_buffer = socket_buffer
        self.registry = Registry()
        self.loop = asyncio.new_event_loop()
        self.executor = Pool(workers or max(32, (os.cpu_count() or 1) * 4),
                             f"bigmachine-{name}", initializer=self._enter)
        self.dispatcher = Dispatcher(self.registry, self.executor, self.loop, self._enter)
        self.connections: dict[str, Connection] = {}  # the ones we dialed, by address
        self.accepted: set[Connection] = set()        # the ones peers dialed
        self._connecting: dict[str, asyncio.Future] = {}
        self.listener: Optional[socket.socket] = None
        self._handshaking = 0                 # accepted connections not yet authenticated
        self._dialing: set[bytes] = set()     # nonces of our handshakes in progress
        self.addr: Optional[str] = None
        self.on_connection_lost: list[Callable[[Connection], None]] = []
        self.b: Any = None  # the B this node belongs to, for current()
        self.thread: Optional[threading.Thread] = None
        self.thread_id: Optional[int] = None
        self.closed = False

    def _enter(self) -> None:
        _local.node = self

    # ---- the loop ---------------------------------------------------------

    def start_thread(self) -> None:
        """Run the IO loop on a daemon thread of its own."""
        ready = threading.Event()

        def run() -> None:
            self._enter()
            mark_loop_thread(self.loop)
            asyncio.set_event_loop(self.loop)
            self.thread_id = threading.get_ident()
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=f"bigmachine-io-{self.name}", daemon=True)
        self.thread.start()
        ready.wait()

    def in_loop(self) -> bool:
        return threading.get_ident() == self.thread_id

    def run_sync(self, coro: Any, timeout: Optional[float] = None) -> Any:
        """Run a coroutine on the IO loop from another thread and wait for it."""
        if self.in_loop():
            coro.close()
            raise Error("this blocking call cannot run on the IO loop; use the async form")
        if self.closed:
            coro.close()
            raise Error(f"{self.name} is shut down")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"timed out after {timeout} s") from None

    async def run_async(self, coro: Any) -> Any:
        """Await a coroutine on the IO loop from any loop."""
        if asyncio.get_running_loop() is self.loop:
            return await coro
        if self.closed:
            coro.close()
            raise Error(f"{self.name} is shut down")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    # ---- serving ------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and accept connections; returns "host:port"."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.addr = f"{host}:{sock.getsockname()[1]}"
        self.loop.add_reader(sock.fileno(), self._on_accept)
        return self.addr

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory: the listener stays readable, so
                # stop watching it for a moment rather than spin on it.
                log.warning("%s: accept failed: %s; pausing for %g s", self.name, exc, ACCEPT_PAUSE)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume_accept)
                return
            if self._handshaking >= MAX_HANDSHAKES:
                sock.close()  # unauthenticated peers may not crowd out real ones
                continue
            self.loop.create_task(self._serve(sock, f"{peer[0]}:{peer[1]}"))

    def _resume_accept(self) -> None:
        if not self.closed and self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        tls = None
        self._handshaking += 1
        try:
            tls = await asyncio.wait_for(self._server_handshake(sock, peer), _auth.HANDSHAKE_TIMEOUT)
        except (asyncio.TimeoutError, ProtocolError, AuthError, OSError, EOFError) as exc:
            reason = "handshake timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            log.warning("%s: refused connection from %s: %s", self.name, peer, reason)
            sock.close()
            return
        finally:
            self._handshaking -= 1
        configure_socket(sock, self.user_timeout, self.socket_buffer)
        self._register(Connection(sock, self.loop, peer, False, self.dispatcher.on_request,
                                  self._on_close, tls=tls))

    async def _server_handshake(self, sock: socket.socket, peer: str) -> Optional[TLSChannel]:
        channel = _Channel(self.loop, sock, peer)
        if self.tls_contexts is not None:
            channel.tls = TLSChannel(self.tls_contexts[0], server_side=True)
            await channel.tls.handshake(self.loop, sock, peer)
        hello = await channel.recv_exact(_auth.HELLO_SIZE, magic=True)
        if _auth.nonce(hello) in self._dialing:
            # Our own hello, relayed back to us by whoever we dialed.
            raise AuthError(peer, "it reflected our own handshake back to us")
        reply, ok = _auth.server_reply(self.creds, hello)
        await channel.send(reply)
        if not ok:
            raise AuthError(peer, "wrong version or cluster")
        proof = await channel.recv_exact(_auth.PROOF_SIZE)
        if not _auth.check_client_proof(self.creds, hello, reply, proof):
            raise AuthError(peer, "it does not know the cluster secret")
        await channel.send(_auth.OK)
        return channel.tls

    # ---- connecting ---------------------------------------------------------

    def connect(self, addr: str, timeout: Optional[float] = CONNECT_TIMEOUT) -> Connection:
        """The connection to addr, dialing and authenticating it if needed.

        timeout bounds the dial and handshake (None: CONNECT_TIMEOUT).
        """
        conn = self.connections.get(addr)
        if conn is not None and not conn.closed:
            return conn
        if self.closed:
            raise MachineLost(addr, "this session is shut down")
        return self.run_sync(self.aconnect_here(addr, timeout))

    async def aconnect(self, addr: str, timeout: Optional[float] = CONNECT_TIMEOUT) -> Connection:
        conn = self.connections.get(addr)
        if conn is not None and not conn.closed:
            return conn
        if self.closed:
            raise MachineLost(addr, "this session is shut down")
        return await self.run_async(self.aconnect_here(addr, timeout))

    async def aconnect_here(self, addr: str, timeout: Optional[float]) -> Connection:
        """On the IO loop: one dial per address at a time; later callers share it."""
        conn = self.connections.get(addr)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(addr)
        if pending is None:
            timeout = CONNECT_TIMEOUT if timeout is None else timeout  # a dial is always bounded
            pending = self._connecting[addr] = self.loop.create_task(self._dial(addr, timeout))
            pending.add_done_callback(lambda _: self._connecting.pop(addr, None))
        return await asyncio.shield(pending)

    async def _dial(self, addr: str, timeout: Optional[float]) -> Connection:
        if self.closed:
            raise MachineLost(addr, "this node is shut down")
        host, port = split_addr(addr)
        try:
            sock, tls = await asyncio.wait_for(self._open(host, port), timeout)
        except asyncio.TimeoutError:
            raise MachineLost(addr, f"cannot connect within {timeout} s") from None
        except OSError as exc:
            raise MachineLost(addr, f"cannot connect: {exc}") from exc
        configure_socket(sock, self.user_timeout, self.socket_buffer)
        conn = Connection(sock, self.loop, addr, True, self.dispatcher.on_request, self._on_close,
                          tls=tls)
        self._register(conn, addr)
        return conn

    async def _open(self, host: str, port: int) -> tuple[socket.socket, Optional[TLSChannel]]:
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        name = f"{host}:{port}"
        hello = _auth.client_hello(self.creds)
        self._dialing.add(_auth.nonce(hello))
        try:
            sock.setblocking(False)
            await self.loop.sock_connect(sock, sockaddr)
            channel = _Channel(self.loop, sock, name)
            if self.tls_contexts is not None:
                channel.tls = TLSChannel(self.tls_contexts[1], server_side=False)
                await channel.tls.handshake(self.loop, sock, name)
            await channel.send(hello)
            reply = await channel.recv_exact(_auth.SERVER_HELLO_SIZE)
            proof = _auth.check_server_hello(self.creds, name, hello, reply)
            await channel.send(proof)
            ok = await channel.recv_exact(1)
            if ok != _auth.OK:
                raise AuthError(name, "refused our proof")
            return sock, channel.tls
        except BaseException:
            sock.close()
            raise
        finally:
            self._dialing.discard(_auth.nonce(hello))

    def _register(self, conn: Connection, addr: Optional[str] = None) -> None:
        conn.node = self  # type: ignore[attr-defined]  # replies on it belong to this cluster
        if addr is not None:
            self.connections[addr] = conn
        else:
            self.accepted.add(conn)
        conn.addr_key = addr  # type: ignore[attr-defined]

    def _on_close(self, conn: Connection) -> None:
        key = getattr(conn, "addr_key", None)
        if key is not None and self.connections.get(key) is conn:
            del self.connections[key]
        self.accepted.discard(conn)
        for callback in list(self.on_connection_lost):
            callback(conn)

    # ---- shutdown -------------------------------------------------------------

    def close(self) -> None:
        """Close every connection, stop the loop and the thread pool. Idempotent."""
        if self.closed:
            return
        self.closed = True

        def stop() -> None:
            if self.listener is not None:
                self.loop.remove_reader(self.listener.fileno())
                self.listener.close()
            for conn in list(self.connections.values()) + list(self.accepted):
                conn._fail(MachineLost(conn.peer, "shut down"))
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        if self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(stop)
            if not self.in_loop():
                self.thread.join(5)
                if not self.loop.is_running():
                    self.loop.close()
        self.executor.shutdown()


class _Channel:
    """Handshake I/O on a non-blocking socket, inside TLS when tls is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str):
        self.loop = loop
        self.sock = sock
        self.host = host
        self.tls: Optional[TLSChannel] = None

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            await self.loop.sock_sendall(self.sock, data)
        else:
            await self.tls.send(self.loop, self.sock, data)

    async def recv_exact(self, n: int, magic: bool = False) -> bytes:
        """Read exactly n bytes (n is ours, never the peer's).

        With magic, the bytes must start with the protocol magic: a peer
        speaking anything else is refused as soon as its first bytes differ.
        """
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        m = len(_auth.MAGIC)
        while got < n:
            if self.tls is None:
                k = await self.loop.sock_recv_into(self.sock, view[got:])
            else:
                k = await self.tls.recv_into(self.loop, self.sock, view[got:], self.host)
            if k == 0:
                if got == 0 and n != 1:
                    raise AuthError(self.host, "the peer closed the connection during the handshake")
                raise AuthError(self.host, "handshake truncated")
            got += k
            if magic and buf[:min(got, m)] != _auth.MAGIC[:min(got, m)]:
                raise ProtocolError(f"not a bigmachine peer (it sent {bytes(buf[:min(got, 16)])!r})")
        return bytes(buf)


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise Error(f"address {addr!r} must look like 'host:port'")
    return host.strip("[]"), int(port)
