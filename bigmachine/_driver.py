"""The driver's session: it starts machines, keeps them alive, re-dials them and stops them."""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Optional

from . import _progress, _rpc
from ._auth import Credentials
from ._connection import Connection
from ._limits import no_core_dumps, raise_open_files
from ._logforward import SERVICE as LOGS, Logs, this_process
from ._machine import Control, Machine, State
from ._node import Node, current_node, set_default
from ._observe import Observing
from ._serialize import dumps
from ._service import check_services
from ._session import B
from ._tls import ClusterCA
from ._wire import KIND_PING
from .backends import System
from .errors import AuthError, Error, MachineLost

if TYPE_CHECKING:
    from ._statuspage import StatusPage

log = logging.getLogger("bigmachine")

_live: "weakref.WeakSet[Driver]" = weakref.WeakSet()
REDIAL_ATTEMPT = 2.0   # seconds one re-dial of a broken link may take
REDIAL_PAUSE = 0.1     # seconds between re-dials
START_JOIN = 5.0       # seconds shutdown waits for starts made without waiting to end


class Driver(Observing, B):
    """The driver's session: the machines it started (it owns them) and dialled."""

    def __init__(self, system: System):
        """A session on system, which bm.start() has configured, checked and initialised;
        if the session cannot start, it shuts the system down."""
        self.system = system
        try:
            raise_open_files()
            no_core_dumps(lock=False)  # before the secrets exist
            creds = Credentials.generate(ClusterCA(system.cert_lifetime) if system.tls else None)
            identity = creds.ca.issue("driver") if creds.ca is not None else None
            node = Node(creds, "driver", user_timeout=system.lost_after, identity=identity,
                        socket_buffer=system.socket_buffer, shared_memory=system.shared_memory,
                        busy_poll=system.busy_poll)
        except BaseException:
            system.shutdown()
            raise
        B.__init__(self, node, self.system.keepalive_period, self.system.lost_after)
        Observing.__init__(self)
        self._controls: dict[str, Control] = {}   # by machine name
        self._starts: list[threading.Thread] = []  # of b.start(wait=False), still bringing up
        self._counter = 0
        self._renewed = time.monotonic()
        self._page: Optional[StatusPage] = None
        self._transfers: Optional[_progress.TransferBars] = None
        node.start_thread()
        node.registry.add(LOGS, Logs())  # machines send their log records here
        node.on_connection_lost.append(self._on_connection_lost)
        set_default(node)
        self.start_timer()
        _live.add(self)
        if _progress.on_terminal(self.system.progress):
            self._transfers = _progress.TransferBars(node)
        if self.system.status_addr is not None:
            # Imported here: only a session that asks for the page needs it (and http.server).
            from . import _statuspage
            try:
                self._page = _statuspage.StatusPage(self, self.system.status_addr)
            except BaseException:
                self.shutdown()
                raise

    @property
    def status_url(self) -> Optional[str]:
        """The status page's address, "http://HOST:PORT/TOKEN/" (None without status_addr)."""
        return self._page.url if self._page is not None else None

    # ---- machines ------------------------------------------------------------

    def start(self, n: int, services: dict, timeout: Optional[float] = None, *,
              min_machines: Optional[int] = None, wait: bool = True,
              env: Optional[dict] = None) -> list[Machine]:
        """Start n machines with these services (see B.start)."""
        if self._closed:
            raise Error("this session is shut down")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise Error(f"cannot start {n!r} machines: n must be a positive int")
        if min_machines is not None and not (isinstance(min_machines, int) and 0 < min_machines <= n):
            raise Error(f"min_machines must be an int between 1 and n={n}, not {min_machines!r}")
        if env is not None and not (isinstance(env, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise Error(f"env must be a dict of str names to str values, not {env!r}")
        check_services(services)
        if "Supervisor" in services:
            raise Error("the service name 'Supervisor' is reserved")
        dumps(services)  # fail here, before any process starts, if they cannot be pickled
        timeout = timeout if timeout is not None else self.system.start_timeout
        with self._lock:
            names = [f"m{self._counter + i}" for i in range(n)]
            self._counter += n
            controls = [Control.new(self.node, name, self) for name in names]
            for control in controls:
                self._controls[control.machine.name] = control
        machines = [c.machine for c in controls]
        if not wait:
            start = threading.Thread(target=self._bring_up_later,
                                     args=(controls, services, timeout, env, n),
                                     daemon=True, name="bigmachine-start")
            with self._lock:
                if self._closed:
                    raise Error("this session has shut down")
                self._starts.append(start)
            start.start()
            return machines
        errors = self._bring_up(controls, services, timeout, env, min_machines or n)
        if errors and min_machines is None:
            raise errors[0]
        if n - len(errors) < (min_machines or n):
            raise Error(f"only {n - len(errors)} of {n} machines came up; at least "
                        f"{min_machines} were needed (all were stopped)") from errors[0]
        return [m for m in machines if m.state == State.RUNNING]

    def _bring_up_later(self, controls: list[Control], services: dict, timeout: float,
                        env: Optional[dict], needed: int) -> None:
        """_bring_up on a thread of its own (b.start(wait=False)), which shutdown awaits."""
        try:
            self._bring_up(controls, services, timeout, env, needed)
        finally:
            with self._lock:
                self._starts.remove(threading.current_thread())

    def _bring_up(self, controls: list[Control], services: dict, timeout: float,
                  env: Optional[dict], needed: int) -> list[BaseException]:
        """Launch and register machines; return the failures (those machines are STOPPED).

        When fewer than needed can come up, every machine of the batch is stopped.
        """
        try:
            launched = self.system.launch(self.node.creds, [c.machine.name for c in controls],
                                          timeout, env)
        except BaseException as exc:
            for control in controls:
                control.stopped(exc)
            if not isinstance(exc, Exception):
                raise  # Ctrl-C and the like: the system ended what it launched
            return [exc]
        if self._closed:  # shut down while they were launched: they start for no one
            for proc in launched:
                if not isinstance(proc, BaseException):
                    proc.stop(0)
            lost = MachineLost(controls[0].machine.addr, "the session shut down while it started")
            for control in controls:
                control.stopped(lost)
            return [lost for _ in controls]
        errors: dict[str, BaseException] = {}
        for control, result in zip(controls, launched):
            if isinstance(result, BaseException):  # this one could not be launched
                errors[control.machine.name] = result
                control.stopped(result)
            else:
                control.launched(result)
        booting = [c for c in controls if c.machine.name not in errors]
        if len(controls) == 1 and booting:
            # Here, not in a pool's thread: two thread switches fewer on the way to a
            # session's first call (1-2 ms on a loaded host).
            try:
                self._boot(booting[0], services, timeout)
            except Exception as exc:
                errors[booting[0].machine.name] = exc
        elif booting:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(booting), 16)) as pool, \
                    _progress.machines_bar(len(controls),
                                           _progress.on_terminal(self.system.progress)) as bar:
                bar.update(len(errors))
                futures = {pool.submit(self._boot, c, services, timeout): c for c in booting}
                for future in concurrent.futures.as_completed(futures):
                    bar.update(1)
                    if future.exception() is not None:
                        errors[futures[future].machine.name] = future.exception()
        failed = [errors[c.machine.name] for c in controls if c.machine.name in errors]
        if len(controls) - len(failed) < needed:
            self.stop_machines([c.machine for c in booting])
        else:
            self.stop_machines([c.machine for c in booting if c.machine.name in errors])
        return failed

    def _boot(self, control: Control, services: dict, timeout: float) -> None:
        m, proc = control.machine, control.process
        try:
            conn = control.connect(timeout)
            lease = self.system.lease if self.system.keepalives else None
            # Its log records come to this process's logging, at its level, from now on.
            _rpc.call(conn, "Supervisor.register", (services,),
                      {"lease": lease, "token": self.node.creds.owner_token(m.name),
                       "log_level": logging.getLogger().getEffectiveLevel(),
                       "driver_process": this_process()}, timeout)
        except BaseException as exc:
            if isinstance(exc, MachineLost) and not proc.alive(0.5):
                # It died while starting: say how, with its last words if the system kept them.
                lost = MachineLost(m.addr, str(proc.error("exited while starting")))
                control.stopped(lost)
                raise lost from exc
            control.stopped(exc)
            raise
        control.running()

    def machines(self) -> list[Machine]:
        """The machines of this session that are not STOPPED: started and dialled."""
        with self._lock:
            owned = [c.machine for c in self._controls.values() if c.machine.state != State.STOPPED]
        return owned + super().machines()

    def _status_machines(self) -> list[Machine]:
        """What status() reports: every machine started (stopped ones with their error)
        and the dialled ones still in use."""
        with self._lock:
            owned = [c.machine for c in self._controls.values()]
        return owned + super().machines()

    def stop_machines(self, machines: list[Machine], timeout: Optional[float] = None) -> None:
        """Stop owned machines and wait for their processes (idempotent)."""
        def stop(m: Machine) -> None:
            control = self._controls.get(m.name)
            if control is None or control.machine is not m:
                raise Error(f"machine {m.name} is not owned by this session")
            conn = control.conn
            asked = False
            if conn is not None and not conn.closed and m.state != State.STOPPED:
                try:
                    _rpc.call(conn, "Supervisor.shutdown", (),
                              {"token": self.node.creds.owner_token(m.name)}, 1.0)
                    asked = True
                except Exception:
                    pass  # it is stopped below either way
            if control.process is not None:
                # A machine that was not asked to stop (its start failed, or its
                # connection is gone) gets a short grace before it is killed.
                grace = 3.0 if asked else 0.5
                control.process.stop(timeout=grace if timeout is None else min(grace, timeout))
            control.stopped(MachineLost(m.addr, "the session shut it down"))

        if len(machines) == 1:
            stop(machines[0])
        elif machines:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(machines), 16)) as pool:
                list(pool.map(stop, machines))

    # ---- keepalives, renewals, re-dials --------------------------------------

    def tick(self, now: float) -> None:
        super().tick(now)
        with self._lock:
            controls = list(self._controls.values())
        for control in controls:
            self._keep_alive(control, now)
        if self.node.creds.ca is not None and now - self._renewed > self.system.cert_lifetime / 2:
            self._renewed = now
            self.node.loop.run_in_executor(None, self._renew_certificates)

    def _keep_alive(self, control: Control, now: float) -> None:
        """Ping one running machine, or fail its link when it has gone quiet or exited."""
        conn = control.conn
        m = control.machine
        if m.state != State.RUNNING or conn is None or conn.closed:
            return
        if not self.system.keepalives:
            if not control.process.alive():
                conn.fail(MachineLost(m.addr, f"its process exited ({self._exit_reason(m)})"))
            return
        if now - conn.last_recv > self.lost_after:
            conn.fail(MachineLost(m.addr, f"no reply to keepalives for {self.lost_after:g} s"))
        elif not control.process.alive():
            conn.fail(MachineLost(m.addr, f"its process exited ({self._exit_reason(m)})"))
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
        with self._lock:
            controls = list(self._controls.values())
        for control in controls:
            m = control.machine
            if m.state != State.RUNNING:
                continue
            try:
                identity = ca.issue(m.name, control.process.cert_hosts)
                m.call("Supervisor.renew", identity.to_dict(),
                       token=self.node.creds.owner_token(m.name), timeout=10.0)
            except Exception as exc:  # one machine's trouble must not stop the others' renewal
                log.warning("could not renew the certificate of %s: %s", m.name, exc)

    def _on_connection_lost(self, conn: Connection) -> None:
        """An owned machine's link broke: re-dial it, unless its process is gone."""
        with self._lock:
            control = next((c for c in self._controls.values() if c.conn is conn), None)
        if control is None or control.machine.state != State.RUNNING or self._closed:
            return
        proc = control.process
        if not proc.alive(0.05):
            control.stopped(MachineLost(control.machine.addr,
                                        f"its process exited ({self._exit_reason(control.machine)})"))
            return
        deadline = conn.last_recv + self.lost_after
        try:
            self.node.loop.call_soon_threadsafe(
                lambda: self.node.loop.create_task(self._redial(control, conn, deadline)))
        except RuntimeError:  # the loop is closed: the session is going away
            control.stopped(conn.error)

    async def _redial(self, control: Control, broken: Connection, deadline: float) -> None:
        """Dial the machine again until deadline and prove ownership on the new link.

        Calls that were in flight on the broken link have failed with
        MachineLost (they may have run); calls made meanwhile wait for this.
        """
        m = control.machine
        token = self.node.creds.owner_token(m.name)
        last: Optional[BaseException] = None
        while not self._closed and m.state == State.RUNNING:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                conn = await self.node.aconnect_here(m.addr, min(left, REDIAL_ATTEMPT), m.name)
                await _rpc.acall(conn, "Supervisor.claim", (), {"token": token},
                                 min(max(deadline - time.monotonic(), 0.1), REDIAL_ATTEMPT))
            except AuthError as exc:  # another member answers there now: ours is gone
                last = exc
                break
            except (MachineLost, TimeoutError, OSError) as exc:
                last = exc
                if not control.process.alive():
                    break
                await asyncio.sleep(REDIAL_PAUSE)
                continue
            log.info("%s: re-dialled after its link broke (%s)", m.name, broken.error)
            control.reconnected(conn)
            return
        if m.state != State.RUNNING:
            return
        if not control.process.alive():
            err = MachineLost(m.addr, f"its process exited ({self._exit_reason(m)})")
        elif last is None:
            err = MachineLost.because(m.addr, broken.error)
        else:
            err = MachineLost(m.addr, f"cannot reach it again within {self.lost_after:g} s "
                                      f"(its link broke: {broken.error}; last attempt: {last})")
        err.__cause__ = broken.error
        control.stopped(err)

    # ---- shutdown -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the machines this session owns, then its own IO. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            owned = [c.machine for c in self._controls.values()]
        if self._page is not None:
            self._page.close()
        if self._transfers is not None:
            self._transfers.close()
        self.stop_machines(owned)
        with self._lock:
            starts = list(self._starts)
        for start in starts:  # before the system goes: they may still be launching on it
            start.join(START_JOIN)
        self.system.shutdown()
        self.node.close()
        _live.discard(self)
        if current_node() is self.node:
            # Another session still running in this process becomes the default,
            # so that Machines unpickled in its callers' threads stay usable.
            others = [b for b in _live if not b._closed]
            set_default(others[-1].node if others else None)


@atexit.register
def _shutdown_all() -> None:
    for b in list(_live):
        try:
            b.shutdown()
        except Exception:
            log.exception("shutting down %r at exit", b)
