"""Making calls: send a request on a connection and wait for its reply or stream.

A blocking call without a deadline reads its own reply when no other thread
is reading the connection (see _reader); otherwise the reader hands the reply
over with one lock release. Replies are unpickled in the caller's thread or loop.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterator, Optional

from ._connection import Connection
from ._serialize import dumps, load_exception, loads
from ._streams import Stream
from ._threadstate import swap_node
from ._waiters import Waiter, on_loop_thread
from ._writer import SMALL_MESSAGE
from ._wire import KIND_CREDIT, MFLAG_STREAM, MTYPE_ERROR, MTYPE_ITEM, MTYPE_REPLY, MTYPE_REQUEST
from .errors import Error, MachineLost, ProtocolError, ResourceError


# A request of one pickle at most this long is a small message, which is sent
# at once, never waiting for room (its frame adds a header and segment table).
SMALL_REQUEST = SMALL_MESSAGE - 64


def _on_loop(method: str) -> Error:
    """What a blocking call made on the IO loop raises."""
    return Error(f"cannot make the blocking call {method} on the IO loop; "
                 "use acall/astream from async code")


def encode_request(method: str, args: tuple, kwargs: dict) -> tuple[list, list]:
    if not isinstance(method, str):
        raise Error(f"method must be a 'Service.method' string, not {method!r}")
    try:
        return dumps((method, args, kwargs))
    except Error as exc:
        raise Error(f"cannot send {method}: {exc}") from exc.__cause__


def _result(conn: Connection, item: tuple, stream: bool = False) -> Any:
    """What one message of the peer's answer means: a value, or an error to raise.

    stream: the answer of a stream, whose items are values; a plain call's is a
    reply or an error only, anything else a ProtocolError that closes the connection.
    """
    mtype, payload = item
    if mtype == MTYPE_REPLY or mtype == MTYPE_ERROR or (mtype == MTYPE_ITEM and stream):
        # Unpickle as a member of the connection's cluster: a Machine in the
        # reply becomes a handle of that cluster, whatever thread asks.
        node = conn.node
        previous = swap_node(node)
        try:
            if mtype != MTYPE_ERROR:
                return loads(payload)
            error = load_exception(payload)
        except ResourceError:
            raise  # this process could not take the reply: say so as it is
        except Exception as exc:
            raise Error(f"cannot unpickle a reply from {conn.peer}: {exc}") from exc
        finally:
            if previous is not node:
                swap_node(previous)
        raise error
    if mtype is None:  # the connection failed; payload is why
        raise MachineLost.because(getattr(payload, "addr", conn.peer), payload)
    error = ProtocolError(f"{conn.peer} answered a {'stream' if stream else 'call'} "
                          f"with message type {mtype}")
    conn.fail(error)  # else the call stays registered, awaiting a reply that has come
    raise error


def call(conn: Connection, method: str, args: tuple, kwargs: dict,
         timeout: Optional[float]) -> Any:
    """Blocking call; raises TimeoutError after timeout seconds (and cancels remotely)."""
    if on_loop_thread(conn.loop):
        raise _on_loop(method)
    message = encode_request(method, args, kwargs)
    deadline = None if timeout is None else time.monotonic() + timeout
    # Read the reply ourselves if nobody else reads (no deadline: a leader's
    # read has none). Take the reading role before a small request goes out: a
    # reply that came back before we took it would wake the standby and a
    # reader thread to hand it over. After a large one: a caller still sending
    # (or waiting for room to) would hold up every other reply on the connection.
    lead = deadline is None
    early = lead and len(message[0]) == 1 and len(message[0][0]) <= SMALL_REQUEST
    conn.gate.acquire(timeout)
    reader, waiter = conn.reader, None
    try:
        sid, waiter = conn.new_call(lead=lead)
        try:
            if early:
                reader.try_lead(waiter)
            conn.send(sid, MTYPE_REQUEST, 0, *message, deadline=deadline)
            if lead and not early:
                reader.try_lead(waiter)
            if lead and reader.leads(waiter):
                reader.read_until(waiter)
            item = waiter.get(None if deadline is None else deadline - time.monotonic())
        except TimeoutError:
            conn.cancel(sid)
            raise TimeoutError(f"{method} on {conn.peer} timed out after {timeout} s") from None
        except BaseException:
            conn.cancel(sid)
            raise
    finally:
        reader.leave_if_leading(waiter)
        conn.gate.release()
    return _result(conn, item)


async def acall(conn: Connection, method: str, args: tuple, kwargs: dict,
                timeout: Optional[float], decode: bool = True) -> Any:
    """The asyncio form of call; cancelling the awaiting task cancels the remote work.

    decode=False: a reply is not unpickled (None is returned); errors still are.
    """
    message = encode_request(method, args, kwargs)
    loop = asyncio.get_running_loop()  # once: a getpid system call on Python 3.11
    if not conn.gate.try_acquire():
        await conn.gate.aacquire()
    try:
        sid, waiter = conn.new_call(False, loop)
        try:
            if timeout is None:  # the usual case, without a coroutine more
                if not conn.send_in_turn(sid, MTYPE_REQUEST, 0, *message, loop):
                    await conn.asend(sid, MTYPE_REQUEST, 0, *message)
                fut = waiter.arrival(loop)
                while fut is not None:
                    await fut
                    fut = waiter.arrival(loop)
                item = waiter.items.popleft()
            else:
                item = await asyncio.wait_for(_exchange(conn, sid, message, waiter), timeout)
        except asyncio.TimeoutError:
            conn.cancel(sid)
            raise TimeoutError(f"{method} on {conn.peer} timed out after {timeout} s") from None
        except BaseException:
            conn.cancel(sid)
            raise
    finally:
        conn.gate.release()
    if not decode and item[0] == MTYPE_REPLY:
        return None
    return _result(conn, item)


async def _exchange(conn: Connection, sid: int, message: tuple, waiter: Waiter) -> tuple:
    """Send a request and await the first message of its answer (an acall with a
    timeout: wait_for needs a coroutine; made only then, not on every call)."""
    await conn.asend(sid, MTYPE_REQUEST, 0, *message)
    return await waiter.aget()


def _consumed(conn: Connection, state: Stream) -> None:
    credit = state.consumed_one()
    if credit:
        conn.send_control(KIND_CREDIT, state.sid, credit)


def _close(conn: Connection, state: Stream) -> None:
    if state.close():
        conn.cancel(state.sid)


def stream(conn: Connection, method: str, args: tuple, kwargs: dict,
           timeout: Optional[float]) -> Iterator[Any]:
    """Blocking iterator over a stream; timeout bounds the wait for each item."""
    if on_loop_thread(conn.loop):
        raise _on_loop(method)
    message = encode_request(method, args, kwargs)
    conn.gate.acquire(timeout)
    try:
        sid, waiter = conn.new_call()
        state = Stream(sid)
        try:
            conn.send(sid, MTYPE_REQUEST, MFLAG_STREAM, *message)
            while True:
                try:
                    item = waiter.get(timeout)
                except TimeoutError:
                    raise TimeoutError(f"{method} on {conn.peer}: no item within {timeout} s") from None
                if not state.received(item[0]):
                    return
                yield _result(conn, item, stream=True)
                _consumed(conn, state)
        finally:
            _close(conn, state)
    finally:
        conn.gate.release()


async def astream(conn: Connection, method: str, args: tuple, kwargs: dict,
                  timeout: Optional[float]) -> AsyncIterator[Any]:
    """The asyncio form of stream."""
    message = encode_request(method, args, kwargs)
    await conn.gate.aacquire()
    try:
        sid, waiter = conn.new_call(stream=True)  # (a stream needs no loop here: see new_call)
        state = Stream(sid)
        try:
            await conn.asend(sid, MTYPE_REQUEST, MFLAG_STREAM, *message)
            while True:
                try:
                    item = await asyncio.wait_for(waiter.aget(), timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{method} on {conn.peer}: no item within {timeout} s") from None
                if not state.received(item[0]):
                    return
                yield _result(conn, item, stream=True)
                _consumed(conn, state)
        finally:
            _close(conn, state)
    finally:
        conn.gate.release()

