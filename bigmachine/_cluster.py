"""B: a bigmachine session. It starts, tracks, keeps alive and stops machines."""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from typing import Any, Optional

from . import _rpc
from ._auth import Credentials
from ._connection import Connection
from ._limits import raise_open_files
from ._machine import Machine, State
from ._node import Node, current_node, set_default
from ._serialize import dumps
from ._service import check_services
from ._tls import ClusterCA
from ._wire import KIND_PING
from .backends import System
from .backends.local import Local
from .errors import Error, MachineLost

log = logging.getLogger("bigmachine")

_live: "weakref.WeakSet[B]" = weakref.WeakSet()


class B:
    """A bigmachine session: the machines it started and those it dialed.

    Use it as a context manager, or call ``shutdown()`` (idempotent; also run
    at interpreter exit).
    """

    def __init__(self, system: Optional[System] = None, *, _node: Optional[Node] = None,
                 **options: Any):
        self._machines: dict[str, Machine] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._counter = 0
        self.machine: Optional[Machine] = None  # on a machine: its own handle
        if _node is not None:  # a machine's own B
            self.system = None
            self.node = _node
            return
        self.system = system if system is not None else Local()
        if options:
            self.system.configure(**options)
        self.system.check()
        raise_open_files()
        creds = Credentials.generate(ClusterCA(self.system.cert_lifetime) if self.system.tls else None)
        identity = creds.ca.issue("driver") if creds.ca is not None else None
        self._renewed = time.monotonic()
        self.node = Node(creds, "driver", user_timeout=self.system.lost_after, identity=identity,
                         socket_buffer=self.system.socket_buffer)
        self.node.b = self
        self.node.start_thread()
        self.node.on_connection_lost.append(self._on_connection_lost)
        set_default(self.node)
        self._keepalive = self.node.run_sync(self._start_keepalive())
        _live.add(self)

    @classmethod
    def _for_machine(cls, node: Node) -> "B":
        b = cls(_node=node)
        b.machine = Machine(node, node.addr, name=node.name, state=State.RUNNING, expect=node.name)
        return b

    def __repr__(self) -> str:
        return f"<B {len(self._machines)} machines{' shut down' if self._closed else ''}>"

    def __enter__(self) -> "B":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- machines ------------------------------------------------------------

    def start(self, n: int, services: dict, timeout: Optional[float] = None) -> list[Machine]:
        """Start n machines with these services; return them once all are RUNNING.

        services maps names to instances of @bigmachine.service classes; each
        instance is pickled and shipped. If any machine fails to start, all of
        this batch are stopped and the first failure's cause is raised.
        """
        if self.system is None:
            raise Error("machines cannot start machines; call start() in the driver")
        if self._closed:
            raise Error("this session is shut down")
        if not isinstance(n, int) or n < 1:
            raise Error(f"cannot start {n!r} machines: n must be a positive int")
        check_services(services)
        if "Supervisor" in services:
            raise Error("the service name 'Supervisor' is reserved")
        dumps(services)  # fail here, before any process starts, if they cannot be pickled
        timeout = timeout if timeout is not None else self.system.start_timeout
        with self._lock:
            names = [f"m{self._counter + i}" for i in range(n)]
            self._counter += n
        launched = self.system.launch(self.node.creds, names, timeout)
        machines = []
        for name, proc in zip(names, launched):
            m = Machine(self.node, proc.addr, name=name, owned=True, expect=name)
            m.process = proc
            machines.append(m)
            with self._lock:
                self._machines[m.addr] = m
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
            futures = [pool.submit(self._boot, m, services, timeout) for m in machines]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self._stop_machines(machines)
            raise failed[0]
        return machines

    def _boot(self, m: Machine, services: dict, timeout: float) -> None:
        try:
            conn = m._connect_now(timeout)
            _rpc.call(conn, "Supervisor.register", (services,),
                      {"lease": self.system.lease, "token": self.node.creds.owner_token(m.name)},
                      timeout)
        except BaseException as exc:
            if isinstance(exc, MachineLost) and m.process is not None and not m.process.alive(0.5):
                # It died while starting: say how, with its last words if the system kept them.
                describe = getattr(m.process, "error", None)
                reason = (str(describe("exited while starting")) if describe is not None else
                          f"it exited while starting ({m.process.describe_exit()})")
                lost = MachineLost(m.addr, reason)
                m._set_state(State.STOPPED, lost)
                raise lost from exc
            m._set_state(State.STOPPED, exc)
            raise
        m._set_state(State.RUNNING)

    def machines(self) -> list[Machine]:
        """All machines of this session: started and dialed."""
        with self._lock:
            return list(self._machines.values())

    def dial(self, addr: str, name: Optional[str] = None) -> Machine:
        """A handle on the machine at addr ("host:port" or "unix:/path"), which this
        session does not own.

        The connection is made on first use; no keepalives are sent to it.
        name, when given, is the member meant: a connection that reaches
        another member at addr fails with AuthError.
        """
        if self._closed:
            raise Error("this session is shut down")
        with self._lock:
            m = self._machines.get(addr)
            if m is None or m.state == State.STOPPED and not m.owned:
                m = self._machines[addr] = Machine(self.node, addr, name=name, state=State.RUNNING,
                                                   expect=name)
            return m

    # ---- keepalives -----------------------------------------------------------

    async def _start_keepalive(self) -> Any:
        return self.node.loop.create_task(self._keepalive_loop())

    async def _keepalive_loop(self) -> None:
        period = self.system.keepalive_period
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if self.node.creds.ca is not None and now - self._renewed > self.system.cert_lifetime / 2:
                self._renewed = now
                self.node.loop.run_in_executor(None, self._renew_certificates)
            for m in self.machines():
                try:
                    self._ping(m, now)
                except Exception:  # one machine's trouble must not stop the others' keepalives
                    log.exception("keepalive of %s failed", m.name)

    def _ping(self, m: Machine, now: float) -> None:
        """Keep one owned machine alive, or declare it lost."""
        conn = m._conn
        if not m.owned or conn is None or conn.closed:
            return
        lost_after = self.system.lost_after
        if now - conn.last_recv > lost_after:
            conn.fail(MachineLost(m.addr, f"no reply to keepalives for {lost_after:g} s"))
        elif m.process is not None and not m.process.alive():
            conn.fail(MachineLost(m.addr, f"its process exited ({m.process.describe_exit()})"))
        else:
            try:
                conn.send_control(KIND_PING, 0, int(now * 1e6))
            except MachineLost:
                pass

    def _renew_certificates(self) -> None:
        """Renew the CA's and every member's certificate before they expire.

        Connections already open stay as they are; new ones use the new
        certificates. A machine that cannot be reached keeps its old one and
        gets another chance at the next renewal.
        """
        ca = self.node.creds.ca
        ca.renew()
        self.node.set_identity(ca.issue("driver"))
        for m in self.machines():
            if not m.owned or m.state != State.RUNNING or m.process is None:
                continue
            try:
                identity = ca.issue(m.name, m.process.cert_hosts)
                m.call("Supervisor.renew", identity.to_dict(),
                       token=self.node.creds.owner_token(m.name), timeout=10.0)
            except Exception as exc:  # one machine's trouble must not stop the others' renewal
                log.warning("could not renew the certificate of %s: %s", m.name, exc)

    def _on_connection_lost(self, conn: Connection) -> None:
        m = self._machines.get(conn.addr_key or "")
        if m is not None and m._conn is conn:
            err = conn.error
            if m.process is not None and not m.process.alive(0.05):
                err = MachineLost(m.addr, f"its process exited ({m.process.describe_exit()})")
            m._set_state(State.STOPPED, err)

    # ---- shutdown -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the machines this session owns, then its own IO. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.system is not None:
            self._stop_machines([m for m in self.machines() if m.owned])
            self.system.shutdown()
        self.node.close()
        _live.discard(self)
        if current_node() is self.node:
            # Another session still running in this process becomes the default,
            # so that Machines unpickled in its callers' threads stay usable.
            others = [b for b in _live if b.system is not None and not b._closed]
            set_default(others[-1].node if others else None)

    def _stop_machines(self, machines: list[Machine]) -> None:
        def stop(m: Machine) -> None:
            conn = m._conn
            asked = False
            if conn is not None and not conn.closed and m.state != State.STOPPED:
                try:
                    _rpc.call(conn, "Supervisor.shutdown", (),
                              {"token": self.node.creds.owner_token(m.name)}, 1.0)
                    asked = True
                except Exception:
                    pass  # it is stopped below either way
            if m.process is not None:
                # A machine that was not asked to stop (its start failed, or its
                # connection is gone) gets a short grace before it is killed.
                m.process.stop(timeout=3.0 if asked else 0.5)
            m._set_state(State.STOPPED, MachineLost(m.addr, "the session shut it down"))

        if machines:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(machines), 16)) as pool:
                list(pool.map(stop, machines))


def start(system: Optional[System] = None, **options: Any) -> B:
    """Start a bigmachine session on system (default: bigmachine.Local()).

    options are passed to the system's configure() (for example
    keepalive_period or lost_after).
    """
    return B(system, **options)


def current() -> B:
    """The B of the calling code: a machine's own B inside a service, else the driver's."""
    node = current_node()
    if node is None or node.b is None:
        raise Error("no bigmachine session: call bigmachine.start() first")
    return node.b


@atexit.register
def _shutdown_all() -> None:
    for b in list(_live):
        try:
            b.shutdown()
        except Exception:
            log.exception("shutting down %r at exit", b)
