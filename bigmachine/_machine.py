"""Machine: the caller's handle on one machine, its state and its calls."""
from __future__ import annotations

import asyncio
import enum
import threading
import time
from typing import Any, AsyncIterator, Iterator, Optional

from . import _rpc
from ._metrics import Counters, acounted_iter, counted, counted_iter
from ._connection import Connection
from ._node import Node, current_node
from .errors import Error, MachineLost


class State(enum.IntEnum):
    """A machine's life: it only moves forward."""

    STARTING = 1
    RUNNING = 2
    STOPPED = 3


class Machine:
    """A handle on a machine: call its services, watch its state.

    ``call``/``stream`` work from any thread; ``acall``/``astream`` from any
    running event loop. A handle pickled into an argument or reply arrives as
    a usable handle on the same machine. The session that started a machine
    owns it (``owned``) and drives it through a ``Control``; a dialled handle
    is owned by no one.
    """

    def __init__(self, node: Node, addr: str, name: Optional[str] = None,
                 state: State = State.RUNNING, expect: Optional[str] = None):
        self._node = node
        self.addr = addr
        self.name = name or addr
        self._expect = expect  # the member's name, when known: the link must reach that member
        self._state = state
        self._err: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._async_waiters: list = []
        self._conn: Optional[Connection] = None
        self._control: Optional["Control"] = None
        self.counters = Counters()  # the calls made through this handle, as the caller sees them

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.addr} {self._state.name}>"

    def __reduce__(self):
        if not self.addr:  # ours, still being launched: it arrives usable once it runs
            self._await_running_to_pass()
        return (_dial, (self.addr, self._expect))

    def _await_running_to_pass(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.wait(State.RUNNING)  # as a call on a STARTING machine does
        else:
            raise Error(f"{self.name} is still starting: await "
                        "m.await_state(bm.State.RUNNING) before passing it from async code")
        if not self.addr:
            if self._err is not None:
                raise MachineLost.because(self.name, self._err)
            raise MachineLost(self.name, "it did not start")

    @property
    def owned(self) -> bool:
        """Whether this session started the machine (and so keeps it alive and stops it)."""
        return self._control is not None

    @property
    def process(self) -> Any:
        """The system's handle on the machine's process (owned machines only)."""
        return self._control.process if self._control is not None else None

    @property
    def member(self) -> Optional[str]:
        """The member's name its links must reach, when known (None: whoever is at addr)."""
        return self._expect

    @property
    def state(self) -> State:
        return self._state

    @property
    def err(self) -> Optional[BaseException]:
        """Why the machine stopped (None while it runs)."""
        return self._err

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop this machine and wait for its process to end (idempotent).

        Only for machines this session started. Calls still in flight fail
        with MachineLost.
        """
        if self._control is None:
            raise Error(f"machine {self.name} was dialled, not started by this session: "
                        "only its owner may shut it down")
        self._control.owner.stop_machines([self], timeout)

    def _set_state(self, state: State, err: Optional[BaseException] = None) -> None:
        with self._cond:
            if state <= self._state:
                return
            self._state = state
            if state == State.STOPPED:
                self._err = err
        self._notify()
        if state == State.STOPPED and self._conn is not None:
            self._conn.fail(err or MachineLost(self.addr, "stopped"))

    def _notify(self) -> None:
        """Wake every waiter: the state or the connection changed."""
        with self._cond:
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:
                pass  # that loop is closed: its waiter gave up

    def wait(self, state: State, timeout: Optional[float] = None) -> State:
        """Block until the machine reaches state or a later one; return the state.

        Raises TimeoutError if that does not happen within timeout seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._state >= state, timeout):
                raise TimeoutError(f"machine {self.name} still {self._state.name} after {timeout} s")
            return self._state

    async def await_state(self, state: State) -> State:
        """The asyncio form of wait (without a timeout: wrap it in asyncio.wait_for)."""
        await self._await(lambda: self._state >= state)
        return self._state

    async def _await(self, done: Any) -> None:
        while not done():
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            with self._cond:
                if done():
                    break
                self._async_waiters.append((loop, fut))
            try:
                await fut
            finally:
                with self._cond:
                    if (loop, fut) in self._async_waiters:
                        self._async_waiters.remove((loop, fut))

    # ---- connections -----------------------------------------------------

    def _lost(self) -> MachineLost:
        err = self._err
        if err is None:
            return MachineLost(self.addr, "stopped")
        if isinstance(err, MachineLost):
            return MachineLost.because(self.addr, err)
        lost = MachineLost(self.addr, f"stopped: {err}")  # e.g. its init raised
        lost.__cause__ = err
        return lost

    def _usable(self, conn: Optional[Connection]) -> bool:
        return conn is not None and not conn.closed

    def _replaced_or_stopped(self, conn: Connection) -> bool:
        return self._conn is not conn or self._state == State.STOPPED

    def _broken_owner_link(self, conn: Optional[Connection], timeout: Optional[float]) -> None:
        """An owned machine's broken link is not its death: its owner re-dials it
        (within lost_after) or declares it lost. Wait for either, never dial here."""
        if not (self.owned and conn is not None and conn.closed):
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._replaced_or_stopped(conn), timeout):
                raise MachineLost.because(self.addr, conn.error)

    async def _abroken_owner_link(self, conn: Optional[Connection], timeout: Optional[float]) -> None:
        if not (self.owned and conn is not None and conn.closed):
            return
        try:
            await asyncio.wait_for(self._await(lambda: self._replaced_or_stopped(conn)), timeout)
        except asyncio.TimeoutError:
            raise MachineLost.because(self.addr, conn.error) from None

    def connection(self, timeout: Optional[float] = None) -> Connection:
        """The open connection to the machine, waiting for it to run (or to be re-dialled)."""
        conn = self._conn
        if self._usable(conn) and self._state == State.RUNNING:
            return conn
        if self._state == State.STARTING:
            self.wait(State.RUNNING, timeout)
        self._broken_owner_link(conn, timeout)
        return self._connect_now(timeout)

    def _connect_now(self, timeout: Optional[float]) -> Connection:
        if self._state == State.STOPPED:
            raise self._lost()
        conn = self._conn
        if self._usable(conn):
            return conn
        if self.owned and conn is not None:
            raise MachineLost.because(self.addr, conn.error)  # its owner decides what comes next
        try:
            conn = self._conn = self._node.connect(self.addr, timeout, self._expect)
        except MachineLost as exc:
            self._set_state(State.STOPPED, exc)
            raise
        return conn

    async def aconnection(self, timeout: Optional[float] = None) -> Connection:
        """The asyncio form of connection."""
        conn = self._conn
        if self._usable(conn) and self._state == State.RUNNING:
            return conn
        if self._state == State.STARTING:
            await asyncio.wait_for(self.await_state(State.RUNNING), timeout)
        await self._abroken_owner_link(conn, timeout)
        if self._state == State.STOPPED:
            raise self._lost()
        conn = self._conn
        if self._usable(conn):
            return conn
        if self.owned and conn is not None:
            raise MachineLost.because(self.addr, conn.error)
        try:
            conn = self._conn = await self._node.aconnect(self.addr, timeout, self._expect)
        except MachineLost as exc:
            self._set_state(State.STOPPED, exc)
            raise
        return conn

    # ---- calls ------------------------------------------------------------

    def call(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Call "Service.method" with the arguments and return its reply.

        Waits for the machine to be RUNNING. Raises what the method raised (with
        the remote traceback as its cause), MachineLost if the machine is gone,
        or TimeoutError after timeout seconds (the remote work is cancelled).
        """
        return counted(self.counters(method), self._call, method, args, kwargs, timeout)

    def _call(self, method: str, args: tuple, kwargs: dict, timeout: Optional[float]) -> Any:
        conn = self._conn
        if conn is None or conn.closed or self._state is not State.RUNNING:  # not the usual case
            deadline = _deadline(timeout)
            conn = self._checked(self.connection(timeout))
            timeout = _left(deadline)  # timeout bounds the whole call, waiting for RUNNING too
        return _rpc.call(conn, method, args, kwargs, timeout)

    async def acall(self, method: str, *args: Any, timeout: Optional[float] = None,
                    **kwargs: Any) -> Any:
        """The asyncio form of call."""
        conn = self._conn
        if conn is not None and not conn.closed and self._state is State.RUNNING:  # the usual case
            call = _rpc.acall(conn, method, args, kwargs, timeout)
        else:
            call = self._acall(method, args, kwargs, timeout)
        # Counted here, not by a wrapping coroutine: each await level is passed
        # through on every resumption of the caller's task.
        counter = self.counters(method)
        if counter is None:
            return await call
        started = counter.begin()
        try:
            result = await call
        except BaseException:
            counter.end(started, True)
            raise
        counter.end(started, False)
        return result

    async def _acall(self, method: str, args: tuple, kwargs: dict, timeout: Optional[float]) -> Any:
        deadline = _deadline(timeout)
        conn = self._checked(await self.aconnection(timeout))
        return await _rpc.acall(conn, method, args, kwargs, _left(deadline))

    def stream(self, method: str, *args: Any, timeout: Optional[float] = None,
               **kwargs: Any) -> Iterator[Any]:
        """Iterate over the items a generator method yields, as they arrive.

        timeout bounds the wait for each item. Stopping early (break, close)
        closes the generator on the machine.
        """
        items = _rpc.stream(self._checked(self.connection(timeout)), method, args, kwargs, timeout)
        return counted_iter(self.counters(method), items)

    async def astream(self, method: str, *args: Any, timeout: Optional[float] = None,
                      **kwargs: Any) -> AsyncIterator[Any]:
        """The asyncio form of stream."""
        conn = self._checked(await self.aconnection(timeout))
        items = _rpc.astream(conn, method, args, kwargs, timeout)
        async for item in acounted_iter(self.counters(method), items):
            yield item

    def _checked(self, conn: Connection) -> Connection:
        if conn.closed:
            raise self._lost() if self._state == State.STOPPED else MachineLost.because(self.addr, conn.error)
        return conn

    def info(self, timeout: Optional[float] = 10.0) -> dict:
        """The machine's name, addr, pid, hostname, cpus (usable: affinity and cgroup
        quota), mem_total (cgroup limit or host memory), versions, start time and
        services (Supervisor.info)."""
        return self.call("Supervisor.info", timeout=timeout)

    @property
    def keepalive_rtt(self) -> list[float]:
        """Recent keepalive round trips (seconds, oldest first) on the current connection."""
        conn = self._conn
        return list(conn.keepalive_rtts) if conn is not None else []

    def stats(self, timeout: Optional[float] = 10.0) -> dict:
        """The machine's memory, load, disk and open calls (Supervisor.stats)."""
        return self.call("Supervisor.stats", timeout=timeout)


class Control:
    """The owning session's side of a machine it started: what only the owner does.

    The session makes each machine with ``Control.new`` and keeps the Control;
    users hold only the Machine.
    """

    def __init__(self, machine: Machine, owner: Any):
        self.machine = machine
        self.owner = owner          # the session: it has stop_machines(machines, timeout)
        self.process: Any = None    # the system's Process, once launched

    @classmethod
    def new(cls, node: Node, name: str, owner: Any) -> "Control":
        machine = Machine(node, "", name=name, state=State.STARTING, expect=name)
        control = machine._control = cls(machine, owner)
        return control

    def launched(self, process: Any) -> None:
        self.process = process
        self.machine.addr = process.addr

    def connect(self, timeout: Optional[float]) -> Connection:
        """Dial the machine (while it starts)."""
        return self.machine._connect_now(timeout)

    @property
    def conn(self) -> Optional[Connection]:
        return self.machine._conn

    def reconnected(self, conn: Connection) -> None:
        """The owner re-dialled the machine: calls from now on use conn."""
        self.machine._conn = conn
        self.machine._notify()

    def running(self) -> None:
        self.machine._set_state(State.RUNNING)

    def stopped(self, err: Optional[BaseException]) -> None:
        self.machine._set_state(State.STOPPED, err)


def live_connection(machine: Machine) -> Optional[Connection]:
    """The machine's open connection, if it has one (never dials)."""
    conn = machine._conn
    return conn if conn is not None and not conn.closed else None


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _dial(addr: str, name: Optional[str] = None) -> Machine:
    """Unpickle a Machine: a handle on the member name at addr in the receiving
    process's cluster."""
    node = current_node()
    if node is None or node.b is None:
        raise Error(f"cannot rebuild a handle on machine {addr}: no bigmachine cluster here")
    return node.b.dial(addr, name)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: Optional[float]) -> Optional[float]:
    """Seconds until deadline (none left: 0, so the next wait times out at once)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
