"""B: what every member's session does: dial machines, watch the dialled ones, close.

The driver's session (``_driver.Driver``) adds starting, keeping alive and
stopping machines; a machine's own session (``_runtime.Runtime``) adds its
own handle. ``bigmachine.current()`` finds the session of the calling code.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Optional

from ._machine import Machine, State, live_connection
from ._node import Node, current_node, parse_addr
from ._wire import KIND_PING
from .errors import Error, MachineLost

log = logging.getLogger("bigmachine")


class B:
    """A session: the machines it can call. Use it as a context manager, or call
    ``shutdown()`` (idempotent).

    ``bm.start()`` returns the driver's session, which also starts, watches and
    stops machines; inside a service ``bm.current()`` returns the machine's own,
    which dials other machines and whose ``machine`` is the machine itself.
    """

    def __init__(self, node: Node, keepalive_period: float, lost_after: float):
        self.node = node
        self.keepalive_period = keepalive_period
        self.lost_after = lost_after
        self._dialled: dict[str, Machine] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._timer_started = False
        node.b = self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.machines())} machines" \
               f"{' shut down' if self._closed else ''}>"

    def __enter__(self) -> "B":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- what only the driver's session does (bm.start returns one) ----------

    def start(self, n: int, services: dict, timeout: Optional[float] = None, *,
              min_machines: Optional[int] = None, wait: bool = True,
              env: Optional[dict] = None) -> list[Machine]:
        """Start n machines with these services (the driver's session only).

        services maps names to instances of @bigmachine.service classes; each
        instance is pickled and shipped. With wait (the default) it returns the
        machines once each is RUNNING; if one fails, all of this batch are
        stopped and the first failure's cause is raised. min_machines=k keeps
        the machines that came up (once every machine has come up or failed),
        marks the rest STOPPED with their causes, and raises only when fewer
        than k came up. wait=False returns STARTING handles at once; a call on
        one waits for it to run, and fails with its start's cause if the start
        fails. env adds variables to each machine's environment.
        """
        raise Error("machines cannot start machines; call start() in the driver")

    def status(self, timeout: float = 10.0) -> Any:
        """Every machine's state, resources, health and calls, as a bm.Status (the
        driver's session only)."""
        raise Error("status() belongs to the driver's session")

    def profile(self, seconds: float = 10.0, machines: Optional[list[Machine]] = None,
                driver: bool = False) -> Any:
        """Sample every thread of the machines for seconds; one merged bm.Profile (the
        driver's session only)."""
        raise Error("profile() belongs to the driver's session")

    def memory_profile(self, seconds: float = 5.0, top: int = 20,
                       machines: Optional[list[Machine]] = None) -> Any:
        """The machines' top allocation sites over seconds, as a bm.MemoryProfile (the
        driver's session only)."""
        raise Error("memory_profile() belongs to the driver's session")

    @property
    def status_url(self) -> Optional[str]:
        """The status page's address ("http://HOST:PORT/TOKEN/"), or None without one."""
        return None

    def machines(self) -> list[Machine]:
        """The machines of this session that are not STOPPED: started and dialled."""
        with self._lock:
            return [m for m in self._dialled.values() if m.state != State.STOPPED]

    def dial(self, addr: str, name: Optional[str] = None) -> Machine:
        """A handle on the machine at addr ("host:port" or "unix:/path"), which this
        session does not own.

        The connection is made on first use. While calls to it are in flight the
        session pings it, so a dead machine fails them within lost_after. name,
        when given, is the member meant: a connection that reaches another
        member at addr fails with AuthError.
        """
        if self._closed:
            raise Error("this session is shut down")
        parse_addr(addr)  # a malformed address is an Error here, not a handle
        with self._lock:
            m = self._dialled.get(addr)
            if m is not None and name is not None and m.member != name:
                # Another member than the one we know there: a handle of its own,
                # which the connection's peer name will refuse unless it is name.
                m = Machine(self.node, addr, name=name, expect=name)
            if m is None or m.state == State.STOPPED:
                m = self._dialled[addr] = Machine(self.node, addr, name=name, expect=name)
        self.start_timer()  # dialled handles are watched
        return m

    def shutdown(self) -> None:
        """Close this session's connections and IO. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.node.close()

    # ---- the session's one timer ---------------------------------------------

    def start_timer(self) -> None:
        """Run tick() every keepalive_period on the IO loop: one timer for all
        machines, once per session."""
        with self._lock:
            if self._timer_started:
                return
            self._timer_started = True

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.keepalive_period)
                try:
                    self.tick(time.monotonic())
                except Exception:  # a bug in one tick must not stop the next
                    log.exception("%s: keepalive tick failed", self.node.name)

        self.node.loop.call_soon_threadsafe(lambda: self.node.loop.create_task(loop()))

    def tick(self, now: float) -> None:
        """Watch dialled machines that have calls in flight: ping them, and fail the
        calls of one that has been silent for lost_after."""
        with self._lock:
            dialled = list(self._dialled.values())
        for m in dialled:
            conn = live_connection(m)
            if conn is None or not conn.calls:
                continue
            silent = now - conn.last_recv
            if silent > self.lost_after:
                conn.fail(MachineLost(m.addr, f"no reply to pings for {self.lost_after:g} s"))
            elif silent > self.keepalive_period:
                try:
                    conn.send_control(KIND_PING, 0, int(now * 1e6))
                except MachineLost:
                    pass


def current() -> B:
    """The B of the calling code: a machine's own B inside a service, else the driver's."""
    node = current_node()
    if node is None or node.b is None:
        raise Error("no bigmachine session: call bigmachine.start() first")
    return node.b
