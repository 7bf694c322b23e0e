"""Serving calls: run the requested method and send its reply or stream.

Requests arrive on the connection's reader thread. Sync methods and
generators run in the node's thread pool and send their replies from there;
coroutines and async generators run as tasks on the node's IO loop. A cancel from the caller cancels the
task, or sets the flag that ``bigmachine.cancelled()`` reports to sync code.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from functools import partial
from typing import Any, Callable, Optional

from ._connection import Connection
from ._reader import complete
from ._metrics import Counters, MethodCounter
from ._serialize import dump_exception, dumps, loads
from ._service import ASYNC, ASYNC_GENERATOR, GENERATOR, SYNC, Registry
from ._streams import CANCELLED, Stream
from ._threadstate import thread_state
from ._waiters import call_soon_threadsafe
from ._writer import SMALL_MESSAGE
from ._wire import MFLAG_STREAM, MTYPE_END, MTYPE_ERROR, MTYPE_ITEM, MTYPE_REPLY
from .errors import Error, MachineLost, ProtocolError


def calling_connection() -> Optional[Connection]:
    """The connection whose call the method running in this thread serves (None
    outside a sync method): the Supervisor learns its owner's link from it."""
    served = thread_state().served
    return served.conn if served is not None else None


def cancelled() -> bool:
    """True if the caller of the method running in this thread gave up on it.

    Long-running sync methods may poll this and return early; async methods
    are cancelled outright (they see CancelledError).
    """
    served = thread_state().served
    return served is not None and served.cancelled


class Served:
    """A call this node is serving: its stream state, and the waiting on it."""

    __slots__ = ("conn", "sid", "stream", "task", "cond", "wakeup", "loop",
                 "counter", "started", "failed", "reply")

    def __init__(self, conn: Connection, sid: int, loop: asyncio.AbstractEventLoop):
        self.conn = conn
        self.sid = sid
        self.loop = loop
        self.stream = Stream(sid)
        self.task: Optional[asyncio.Task] = None
        self.cond: Optional[threading.Condition] = None  # made for streams only
        self.wakeup: Optional[asyncio.Future] = None
        self.counter: Optional[MethodCounter] = None  # counts the call once it is known
        self.started = 0
        self.failed = False
        self.reply: Optional[tuple] = None  # (mtype, message) a sync method's small reply, until sent

    @property
    def cancelled(self) -> bool:
        return self.stream.state is CANCELLED

    def cancel(self) -> None:
        """From any thread: the caller gave up (or the connection closed)."""
        self.stream.cancel()
        self._on_loop(self._cancel_task)
        self._notify()

    def _on_loop(self, callback: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(callback)
        except RuntimeError:
            pass  # the node's loop is closed: none of its tasks or waiters is left to wake

    def _cancel_task(self) -> None:
        task = self.task
        if task is not None and task.cancel():
            # A task cancelled before its first step never runs its coroutine's
            # body, whose finally ends the call: end it then.
            task.add_done_callback(self._end_unended)

    def _end_unended(self, task: asyncio.Task) -> None:
        if self.conn.incoming.get(self.sid) is self:
            self.finish()

    def credit(self, n: int) -> None:
        if self.cond is None:
            return  # not a stream
        with self.cond:
            self.stream.credit(n)
        self._notify()

    def _notify(self) -> None:
        if self.cond is not None:
            with self.cond:
                self.cond.notify_all()
        self._on_loop(self._wake)

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def take_credit(self) -> bool:
        """Thread side: wait for room to send one more item; False if cancelled."""
        stream = self.stream
        with self.cond:
            while stream.credits <= 0 and stream.open and not self.conn.closed:
                self.cond.wait(1.0)
            stream.sent_one()
            return stream.open and not self.conn.closed

    async def atake_credit(self) -> None:
        while self.stream.credits <= 0:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        with self.cond:  # credit() adds from the reader thread
            self.stream.sent_one()

    def send_reply(self) -> None:
        """Send the small reply _run_sync made (see there), once."""
        reply, self.reply = self.reply, None
        if reply is not None:
            _send(self.conn, self.sid, reply[0], reply[1])

    def finish(self) -> None:
        """The call is over (replied, failed or cancelled): forget it and count it."""
        self.conn.incoming.pop(self.sid, None)
        if self.counter is not None:
            self.counter.end(self.started, self.failed or self.stream.state is CANCELLED)


class Dispatcher:
    """Runs requests against a registry, in an executor or on the IO loop."""

    def __init__(self, registry: Registry, executor: Any, loop: asyncio.AbstractEventLoop,
                 node: Any = None):
        self.registry = registry
        self.executor = executor
        self.loop = loop
        # Made current on the thread that reads a request, so that what is
        # unpickled there (a Machine argument) belongs to this node's cluster.
        self.node = node
        self.counters = Counters()  # the calls served here, where the work runs
        self.starting: list = []  # Python 3.12+: coroutine methods to start eagerly (see _start)

    def on_request(self, conn: Connection, sid: int, mflags: int, segments: list) -> None:
        """On the connection's reader thread: start serving one request."""
        if len(conn.incoming) >= conn.max_in_flight:  # more than its own gate lets out
            conn.fail(ProtocolError(f"{conn.peer} has more than {conn.max_in_flight} calls in flight"))
            return
        served = Served(conn, sid, self.loop)
        if self.node is not None:
            thread_state().node = self.node
        try:
            method, args, kwargs = loads(segments)
            fn, kind = self.registry.lookup(method)
            streaming = kind is GENERATOR or kind is ASYNC_GENERATOR  # _service's constants
            if bool(mflags & MFLAG_STREAM) != streaming:
                how = "stream" if mflags & MFLAG_STREAM else "call"
                raise Error(f"cannot {how} {method}: it is a {kind} method; use "
                            f"{'call' if how == 'stream' else 'stream'} instead")
        except BaseException as exc:
            _send(conn, sid, MTYPE_ERROR, dump_exception(exc))
            return
        served.counter = self.counters(method)
        if served.counter is not None:
            served.started = served.counter.begin()
        conn.incoming[sid] = served
        if streaming:
            served.cond = threading.Condition(threading.Lock())
        if kind is SYNC:
            # The reader runs it once the read is handled (see _reader), or
            # the pool does if reading must go on first.
            conn.reader.defer(self.executor.submit, self._serve_sync, served, fn, args, kwargs)
        elif kind is GENERATOR:
            self.executor.submit(_run_generator, served, fn, args, kwargs)
        else:
            run = _run_async if kind is ASYNC else _run_async_generator
            call_soon_threadsafe(self.loop, self._start, (served, method, run, fn, args, kwargs))
            conn.reader.follow()  # the loop reads the next request (see _reader)

    def _serve_sync(self, served: Served, fn: Any, args: tuple, kwargs: dict) -> Optional[Callable[[], None]]:
        """_run_sync, unless the caller is not reading what we send it: then once it
        has (the reply is not made meanwhile), on the pool."""
        if served.conn.over_room():
            served.conn.park(partial(self.executor.submit, complete, self._serve_sync,
                                     served, fn, args, kwargs))
            return None
        return _run_sync(served, fn, args, kwargs)

    def _start(self, start: tuple) -> None:
        """On the IO loop: start a coroutine method's task.

        Python 3.12+ runs a task's first step as it is made (eager_start): a
        method that does not wait answers with no loop turn of its own. Not
        within the read that brought the request, though (this may run at its
        end): there the loop keeps the reading role, and a method that holds
        the loop would keep other calls unread (see _role). One loop callback
        starts a read's methods after it.
        """
        if not _EAGER:
            _start_task(start, False)
            return
        if not self.starting:
            self.loop.call_soon(self._start_eagerly)
        self.starting.append(start)

    def _start_eagerly(self) -> None:
        starting, self.starting = self.starting, []
        for i, start in enumerate(starting):
            try:
                _start_task(start, True)
            except (SystemExit, KeyboardInterrupt):
                rest = starting[i + 1:]  # they start on the loop's next turn
                if rest:
                    if not self.starting:
                        self.loop.call_soon(self._start_eagerly)
                    self.starting[:0] = rest
                raise
            except BaseException as exc:  # as a loop callback's: reported, the rest start
                self.loop.call_exception_handler({"message": f"cannot start {start[1]}",
                                                  "exception": exc})


_EAGER = sys.version_info >= (3, 12)


def _start_task(start: tuple, eager: bool) -> None:
    """Run a coroutine method as a task named after it, unless already cancelled.

    asyncio.Task itself, not loop.create_task (a Python method) unless a
    task factory was set; the name spares asyncio making one per task.
    """
    served, method, run, fn, args, kwargs = start
    if served.cancelled:
        served.finish()
        return
    loop = served.loop
    coro = run(served, fn, args, kwargs)
    try:
        if loop.get_task_factory() is not None:
            served.task = loop.create_task(coro, name=method)
        elif eager:
            served.task = asyncio.Task(coro, loop=loop, name=method, eager_start=True)
        else:
            served.task = asyncio.Task(coro, loop=loop, name=method)
    except BaseException as exc:  # a task factory the service set failed: say so, not hang
        coro.close()
        served.failed = True
        served.finish()
        message = dump_exception(Error(f"cannot start {method}: the loop's task factory "
                                       f"raised {type(exc).__name__}: {exc}"))
        if not _answer_now(served, MTYPE_ERROR, message):
            _send(served.conn, served.sid, MTYPE_ERROR, message)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise


def _send(conn: Connection, sid: int, mtype: int, message: tuple) -> None:
    try:
        conn.send(sid, mtype, 0, message[0], message[1], None, True)
    except MachineLost:
        pass  # the caller is gone; there is no one to tell
    except Exception as exc:  # the reply could not be framed: say so instead
        if mtype == MTYPE_ERROR:
            raise
        _send(conn, sid, MTYPE_ERROR, dump_exception(Error(f"cannot send the reply: {exc}")))


def _reply(result: Any, mtype: int = MTYPE_REPLY) -> tuple[int, tuple]:
    """(mtype, message) for a result, or an error message if it cannot be pickled."""
    try:
        return mtype, dumps(result)
    except Error as exc:
        return MTYPE_ERROR, dump_exception(exc)


def _run_sync(served: Served, fn: Any, args: tuple, kwargs: dict) -> Optional[Callable[[], None]]:
    """Run the method; return the sending of a small reply, or None.

    The reader (see _reader.defer) sends that reply once it reads again, so
    the caller's next request cannot arrive while it is still busy (which
    would make another thread take over reading); a large reply, whose send
    may wait for room, is sent here.
    """
    state = thread_state()
    state.served = served
    stream = served.stream
    try:
        if stream.state is CANCELLED:
            return None
        try:
            mtype, message = _reply(fn(*args, **kwargs))
        except BaseException as exc:
            mtype, message = MTYPE_ERROR, dump_exception(exc)
        served.failed = mtype == MTYPE_ERROR
        if stream.state is CANCELLED:
            return None
        segments = message[0]
        if len(segments) == 1 and len(segments[0]) <= SMALL_MESSAGE:
            served.reply = (mtype, message)
            return served.send_reply
        _send(served.conn, served.sid, mtype, message)
        return None
    finally:
        state.served = None
        served.finish()


def _run_generator(served: Served, fn: Any, args: tuple, kwargs: dict) -> None:
    state = thread_state()
    state.served = served
    gen = None
    try:
        gen = fn(*args, **kwargs)
        for item in gen:
            if not served.take_credit():
                return
            mtype, message = _reply(item, MTYPE_ITEM)
            _send(served.conn, served.sid, mtype, message)
            if mtype == MTYPE_ERROR:
                served.failed = True
                return
        _send(served.conn, served.sid, MTYPE_END, dumps(None))
    except BaseException as exc:
        served.failed = True
        if not served.cancelled:
            _send(served.conn, served.sid, MTYPE_ERROR, dump_exception(exc))
    finally:
        if gen is not None:
            gen.close()
        state.served = None
        served.finish()


def _cancelled_here() -> tuple:
    """The error that answers a method whose task was cancelled, not by its caller."""
    return dump_exception(Error("the method's task was cancelled on the machine "
                                "(not by its caller)"))


def _answer_now(served: Served, mtype: int, message: tuple) -> bool:
    """Send a small answer from the loop without awaiting: True if done (sent, or
    the caller is gone), False if it must be awaited (_asend)."""
    try:
        return served.conn.send_in_turn(served.sid, mtype, 0, *message, served.loop)
    except MachineLost:
        return True
    except Exception:
        return False  # _asend tries again, and answers the failure instead


async def _asend(served: Served, mtype: int, message: tuple) -> None:
    conn = served.conn
    try:
        if not conn.send_in_turn(served.sid, mtype, 0, *message, served.loop):
            await conn.asend(served.sid, mtype, 0, *message)
    except MachineLost:
        pass
    except Exception as exc:
        if mtype == MTYPE_ERROR:
            raise
        await _asend(served, MTYPE_ERROR, dump_exception(Error(f"cannot send the reply: {exc}")))


async def _run_async(served: Served, fn: Any, args: tuple, kwargs: dict) -> None:
    mtype = MTYPE_ERROR  # until a reply is made
    try:
        if served.conn.over_room():  # the caller is not reading what we send it
            await served.conn.await_room()
        mtype, message = _reply(await fn(*args, **kwargs))
    except asyncio.CancelledError:
        if served.cancelled:  # the caller gave up, or the connection closed: no one waits
            return
        mtype, message = MTYPE_ERROR, _cancelled_here()  # its own task was cancelled: say so
    except BaseException as exc:
        mtype, message = MTYPE_ERROR, dump_exception(exc)
    finally:
        served.failed = mtype == MTYPE_ERROR
        served.finish()
    if not _answer_now(served, mtype, message):
        try:
            await _asend(served, mtype, message)  # a large reply awaits the writer's room
        except asyncio.CancelledError:
            if served.cancelled:  # the caller gave up, or the connection closed
                return
            # its own task was cancelled while the reply waited (nothing of it was sent): say so
            await _asend(served, MTYPE_ERROR, _cancelled_here())


async def _run_async_generator(served: Served, fn: Any, args: tuple, kwargs: dict) -> None:
    agen = None
    try:
        agen = fn(*args, **kwargs)
        async for item in agen:
            await served.atake_credit()
            mtype, message = _reply(item, MTYPE_ITEM)
            if not _answer_now(served, mtype, message):
                await _asend(served, mtype, message)
            if mtype == MTYPE_ERROR:
                served.failed = True
                return
        await _asend(served, MTYPE_END, dumps(None))
    except asyncio.CancelledError:
        if not served.cancelled:  # its own task was cancelled, not by the caller: say so
            served.failed = True
            await _asend(served, MTYPE_ERROR, _cancelled_here())
        return
    except BaseException as exc:
        served.failed = True
        await _asend(served, MTYPE_ERROR, dump_exception(exc))
    finally:
        if agen is not None:
            await agen.aclose()
        served.finish()
