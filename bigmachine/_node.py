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
import struct
import threading
from typing import Any, Callable, Optional

from . import _auth, _handshake
from ._admission import Admission, RefusalLog
from ._auth import Credentials
from ._connection import Connection
from ._polling import new_event_loop
from ._sockopts import BUSY_POLL, SOCKET_BUFFER, configure_socket
from ._threadstate import thread_state
from ._waiters import mark_loop_thread
from ._limits import open_files
from ._dispatch import Dispatcher
from ._pool import Pool
from ._service import Registry
from ._tls import Identity, TLSChannel
from .errors import AuthError, Error, MachineLost, ProtocolError

log = logging.getLogger("bigmachine.node")

_default: Optional["Node"] = None
CONNECT_TIMEOUT = 10.0
ACCEPT_PAUSE = 0.5     # seconds to stop accepting after accept() fails
USER_TIMEOUT = 15.0  # TCP_USER_TIMEOUT: how long unacknowledged data may sit
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def current_node() -> Optional["Node"]:
    """The node of the calling thread, else the process's default (the driver's)."""
    return thread_state().node or _default


def set_default(node: Optional["Node"]) -> None:
    global _default
    _default = node


class Node:
    """IO loop, thread pool, services and connections of one cluster member."""

    def __init__(self, creds: Credentials, name: str, workers: Optional[int] = None,
                 user_timeout: float = USER_TIMEOUT, identity: Optional[Identity] = None,
                 socket_buffer: int = SOCKET_BUFFER, shared_memory: bool = False,
                 busy_poll: float = BUSY_POLL):
        self.creds = creds
        # With an identity, every connection (both ways) is TLS 1.3 with
        # certificates of the cluster CA, and the handshake runs inside it.
        self.tls_contexts = identity.contexts() if identity is not None else None
        self.name = name
        self.user_timeout = user_timeout
        self.socket_buffer = socket_buffer
        self.busy_poll = busy_poll  # seconds a plain link's reader polls before it sleeps; 0: never
        self.shared_memory = shared_memory  # Unix-socket links may pass arrays as memfds
        self.registry = Registry()
        self.loop = new_event_loop(busy_poll)
        self.executor = Pool(workers or max(32, (os.cpu_count() or 1) * 4),
                             f"bigmachine-{name}", initializer=self._enter)
        self.dispatcher = Dispatcher(self.registry, self.executor, self.loop, self)
        self.connections: dict[str, Connection] = {}  # the ones we dialed, by address
        self.accepted: set[Connection] = set()        # the ones peers dialed
        self._owner: Optional[Connection] = None      # the one the owner calls on, if a machine
        self._connecting: dict[str, asyncio.Future] = {}
        self.listener: Optional[socket.socket] = None
        self.admission: Optional[Admission] = None  # accepted connections not yet authenticated
        self.refusals = RefusalLog(log, name, self.loop)
        self._dialing: set[bytes] = set()     # nonces of our handshakes in progress
        self.addr: Optional[str] = None
        self.on_connection_lost: list[Callable[[Connection], None]] = []
        self.b: Any = None  # the B this node belongs to, for current()
        self.thread: Optional[threading.Thread] = None
        self.thread_id: Optional[int] = None
        self.closed = False

    def set_identity(self, identity: Identity) -> None:
        """Use identity (a renewed certificate) for connections made from now on."""
        self.tls_contexts = identity.contexts()

    def set_owner(self, conn: Optional[Connection]) -> None:
        """conn is the owner's: close() fails it last (see there)."""
        self._owner = conn

    def _enter(self) -> None:
        thread_state().node = self

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

    async def listen(self, addr: str = "127.0.0.1:0") -> str:
        """Bind addr ("host:port", or "unix:/path" in a private directory) and accept
        connections; returns the address peers dial."""
        kind, where = parse_addr(addr)
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(where)
            os.chmod(where, 0o600)
            self.addr = addr
        else:
            host, port = where
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            self.addr = f"{host}:{sock.getsockname()[1]}"
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.admission = Admission(open_files())
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
            if sock.family == socket.AF_UNIX:
                source = peer_label = "unix"
            else:
                source, peer_label = peer[0], f"{peer[0]}:{peer[1]}"
            task = self.loop.create_task(self._serve(sock, peer_label))
            key = self.admission.admit(source, task.cancel)
            task.add_done_callback(lambda _, k=key: self.admission.done(k))

    def _resume_accept(self) -> None:
        if not self.closed and self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        try:
            if sock.family == socket.AF_UNIX:
                check_peer_user(sock, peer)
            tls = TLSChannel(self.tls_contexts[0], server_side=True) if self.tls_contexts else None
            await asyncio.wait_for(_readable(self.loop, sock), _auth.FIRST_BYTE_TIMEOUT)
            await asyncio.wait_for(
                _handshake.serve(self.creds, self.name, self.loop, sock, peer, tls, self._dialing),
                _auth.HANDSHAKE_TIMEOUT - _auth.FIRST_BYTE_TIMEOUT)
        except asyncio.CancelledError:
            sock.close()
            if not self.closed:
                self.refusals.refused(peer, "dropped to make room for newer connections")
            return
        except (asyncio.TimeoutError, ProtocolError, AuthError, OSError, EOFError) as exc:
            reason = "handshake timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            self.refusals.refused(peer, reason)
            sock.close()
            return
        configure_socket(sock, self.user_timeout, self.socket_buffer)
        self._register(Connection(sock, self.loop, peer, False, self.dispatcher.on_request,
                                  self._on_close, tls=tls, node=self))

    # ---- connecting ---------------------------------------------------------

    def connect(self, addr: str, timeout: Optional[float] = CONNECT_TIMEOUT,
                name: Optional[str] = None) -> Connection:
        """The connection to addr, dialling and authenticating it if needed.

        timeout bounds the dial and handshake (None: CONNECT_TIMEOUT); name,
        when given, is the member we mean: another member there is an AuthError.
        """
        conn = self._usable(addr, name)
        if conn is not None:
            return conn
        if self.closed:
            raise MachineLost(addr, "this session is shut down")
        return self.run_sync(self.aconnect_here(addr, timeout, name))

    async def aconnect(self, addr: str, timeout: Optional[float] = CONNECT_TIMEOUT,
                       name: Optional[str] = None) -> Connection:
        conn = self._usable(addr, name)
        if conn is not None:
            return conn
        if self.closed:
            raise MachineLost(addr, "this session is shut down")
        return await self.run_async(self.aconnect_here(addr, timeout, name))

    def _usable(self, addr: str, name: Optional[str]) -> Optional[Connection]:
        conn = self.connections.get(addr)
        if conn is None or conn.closed:
            return None
        if name is not None and conn.peer_name != name:
            raise AuthError(addr, f"it is member {conn.peer_name!r}, not {name!r}")
        return conn

    async def aconnect_here(self, addr: str, timeout: Optional[float],
                            name: Optional[str] = None) -> Connection:
        """On the IO loop: one dial per address at a time; later callers share it."""
        conn = self._usable(addr, name)
        if conn is not None:
            return conn
        pending = self._connecting.get(addr)
        if pending is None:
            timeout = CONNECT_TIMEOUT if timeout is None else timeout  # a dial is always bounded
            pending = self._connecting[addr] = self.loop.create_task(self._dial(addr, timeout))
            pending.add_done_callback(lambda _: self._connecting.pop(addr, None))
        await asyncio.shield(pending)
        conn = self._usable(addr, name)
        if conn is None:
            raise MachineLost(addr, "the connection closed as it opened")
        return conn

    async def _dial(self, addr: str, timeout: Optional[float]) -> Connection:
        if self.closed:
            raise MachineLost(addr, "this node is shut down")
        try:
            sock, tls, peer_name = await asyncio.wait_for(self._open(addr), timeout)
        except asyncio.TimeoutError:
            raise MachineLost(addr, f"cannot connect within {timeout} s") from None
        except OSError as exc:
            raise MachineLost(addr, f"cannot connect: {exc}") from exc
        configure_socket(sock, self.user_timeout, self.socket_buffer)
        conn = Connection(sock, self.loop, addr, True, self.dispatcher.on_request, self._on_close,
                          tls=tls, node=self, addr_key=addr, peer_name=peer_name)
        self._register(conn)
        return conn

    async def _open(self, addr: str) -> tuple[socket.socket, Optional[TLSChannel], str]:
        kind, where = parse_addr(addr)
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockaddr: Any = where
        else:
            infos = await self.loop.getaddrinfo(*where, type=socket.SOCK_STREAM)
            family, type_, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, type_, proto)
        mine = _auth.hello()
        self._dialing.add(_auth.nonce(mine))
        try:
            sock.setblocking(False)
            await self.loop.sock_connect(sock, sockaddr)
            if kind == "unix":
                check_peer_user(sock, addr)
            tls = TLSChannel(self.tls_contexts[1], server_side=False) if self.tls_contexts else None
            peer_name = await _handshake.dial(self.creds, self.loop, sock, addr, tls, mine, None)
            return sock, tls, peer_name
        except BaseException:
            sock.close()
            raise
        finally:
            self._dialing.discard(_auth.nonce(mine))

    def _register(self, conn: Connection) -> None:
        if conn.addr_key is not None:
            self.connections[conn.addr_key] = conn
        else:
            self.accepted.add(conn)

    def _on_close(self, conn: Connection) -> None:
        key = conn.addr_key
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
                if self.addr is not None and self.addr.startswith("unix:"):
                    _unlink(self.addr[5:])
            # The owner's connection fails last: once the owner sees this
            # machine stop, no other peer's call to it can still be served.
            conns = list(self.connections.values()) + list(self.accepted)
            conns.sort(key=lambda conn: conn is self._owner)
            for conn in conns:
                conn.fail(MachineLost(conn.peer, "shut down"))
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


def parse_addr(addr: str) -> tuple[str, Any]:
    """("unix", path) for "unix:/path", ("tcp", (host, port)) for "host:port"."""
    if not isinstance(addr, str):
        raise Error(f"an address is a 'host:port' or 'unix:/path' string, not {addr!r}")
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path.startswith("/"):
            raise Error(f"address {addr!r}: a Unix socket path must be absolute")
        return "unix", path
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise Error(f"address {addr!r} must look like 'host:port' or 'unix:/path'")
    return "tcp", (host.strip("[]"), int(port))


def check_peer_user(sock: socket.socket, peer: str) -> None:
    """Refuse a Unix-socket peer running as another user (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _, uid, _ = _UCRED.unpack(raw)
    if uid != os.getuid():
        raise AuthError(peer, f"its process runs as uid {uid}, not as us ({os.getuid()})")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until sock has bytes to read (or is closed)."""
    fut = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())
