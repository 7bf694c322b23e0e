"""A caller's event loop reads its own replies (see _role): once a read by a
reader thread woke only that loop and every call in flight is its own, the
loop takes the reading role, so its replies need no thread hand-off; it gives
the role back when its calls are over, and any other caller (a blocking one,
another loop) takes it back at once, since the loop may stop, or block, before
that caller's reply comes.

Each test drives a real Connection whose peer is a raw socket (tests.rawpeer).
LOOP_STALL, after which the standby takes the role from a loop that reads
nothing, is made far longer than any wait here: a role left with a loop that
cannot read would show as a timeout, not as a 100 ms pause."""
from __future__ import annotations

import asyncio
import threading

import pytest

import bigmachine as bm
from bigmachine import _role, _rpc, _wire
from tests.rawpeer import raw_connection, wait_for
from tests.services import Echo

ON_LOOP = "on loop"


@pytest.fixture(autouse=True)
def no_stall_rescue(monkeypatch):
    monkeypatch.setattr(_role, "LOOP_STALL", 60.0)


async def echo_many(conn, n: int, window: int, seen: list) -> list:
    """n acalls of echo, window in flight; seen gets the reader's (state, role loop)
    after each reply."""
    ids = iter(range(n))
    out = [None] * n

    async def worker():
        for i in ids:
            out[i] = await _rpc.acall(conn, "echo", (i,), {}, None)
            seen.append((conn.reader._state, conn.reader._role_loop))

    await asyncio.gather(*(worker() for _ in range(window)))
    return out


def on_loop(conn, loop) -> bool:
    return conn.reader._state == ON_LOOP and conn.reader._role_loop is loop


@pytest.mark.timeout(60)
def test_a_callers_loop_reads_its_own_replies_and_gives_the_role_back_when_done():
    with raw_connection() as (conn, peer, requests):
        seen: list = []

        async def run():
            return await echo_many(conn, 2000, 50, seen), asyncio.get_running_loop()

        out, loop = asyncio.run(run())
        assert out == list(range(2000))
        held = sum(1 for state, role in seen if state == ON_LOOP and role is loop)
        assert held > len(seen) // 2, f"the caller's loop held the role for {held} of {len(seen)} replies"
        # Its calls over, the loop (closed since) gave the role back to a reader thread.
        assert wait_for(lambda: conn.reader._state == "reading", 5), conn.reader._state
        assert conn.reader._watching is None
        assert _rpc.call(conn, "echo", ("after",), {}, 5) == "after"


def stopped_holding_the_role(conn):
    """A loop stopped (not closed) while it holds the role, with a call of its own in
    flight (the raw peer never answers "wait"): (loop, that call's task)."""
    loop = asyncio.new_event_loop()

    async def start():
        anchor = asyncio.ensure_future(_rpc.acall(conn, "wait", (), {}, None))
        await echo_many(conn, 400, 20, [])
        await asyncio.sleep(0)  # a turn: the role stays, a call of the loop's being in flight
        assert on_loop(conn, asyncio.get_running_loop()), conn.reader._state
        return anchor

    anchor = loop.run_until_complete(start())
    assert not loop.is_running() and on_loop(conn, loop) and len(conn.calls) == 1
    return loop, anchor


def finish(loop, anchor) -> None:
    anchor.cancel()
    loop.run_until_complete(asyncio.gather(anchor, return_exceptions=True))
    loop.close()


@pytest.mark.timeout(60)
def test_a_blocking_call_takes_the_role_from_a_loop_that_stopped():
    with raw_connection() as (conn, peer, requests):
        loop, anchor = stopped_holding_the_role(conn)
        assert _rpc.call(conn, "echo", ("blocking",), {}, None) == "blocking"
        assert _rpc.call(conn, "echo", ("with a deadline",), {}, 10) == "with a deadline"
        finish(loop, anchor)


@pytest.mark.timeout(60)
def test_an_acall_from_another_loop_takes_the_role_from_a_loop_that_stopped():
    with raw_connection() as (conn, peer, requests):
        loop, anchor = stopped_holding_the_role(conn)

        async def other():
            return await asyncio.wait_for(_rpc.acall(conn, "echo", ("other",), {}, None), 10)

        assert asyncio.run(other()) == "other"
        finish(loop, anchor)


@pytest.mark.timeout(60)
def test_a_blocking_call_on_the_thread_of_the_loop_holding_the_role_is_read():
    """A coroutine that makes a blocking call blocks its own loop: the loop cannot
    read that call's reply, so the caller takes the role."""
    with raw_connection() as (conn, peer, requests):
        async def run():
            anchor = asyncio.ensure_future(_rpc.acall(conn, "wait", (), {}, None))
            await echo_many(conn, 400, 20, [])
            await asyncio.sleep(0)
            assert on_loop(conn, asyncio.get_running_loop()), conn.reader._state
            value = _rpc.call(conn, "echo", ("from the loop's thread",), {}, None)  # blocks the loop
            anchor.cancel()
            return value

        assert asyncio.run(run()) == "from the loop's thread"


@pytest.mark.timeout(60)
def test_the_role_stays_with_a_reader_thread_while_a_thread_has_a_call_in_flight():
    """A thread's call in flight (the raw peer never answers "wait"): the loop never
    takes the role, which it could leave unread when it stops."""
    with raw_connection() as (conn, peer, requests):
        errors: list = []

        def waits():
            try:
                _rpc.call(conn, "wait", (), {}, 4)
            except TimeoutError as exc:
                errors.append(exc)

        thread = threading.Thread(target=waits, daemon=True)
        thread.start()
        assert wait_for(lambda: len(conn.calls) == 1, 5)
        seen: list = []

        async def run():
            return await echo_many(conn, 1000, 20, seen), asyncio.get_running_loop()

        out, loop = asyncio.run(run())
        assert out == list(range(1000))
        assert thread.is_alive(), "the thread's call ended before the loop's: the test proves nothing"
        held = [state for state, role in seen if state == ON_LOOP and role is loop]
        assert not held, f"the loop took the role for {len(held)} of {len(seen)} replies"
        thread.join(10)
        assert len(errors) == 1


@pytest.mark.timeout(60)
def test_a_loop_that_cannot_watch_a_socket_leaves_the_reading_to_threads():
    class NoReaders(asyncio.SelectorEventLoop):
        refused = 0

        def add_reader(self, fd, callback, *args):
            NoReaders.refused += 1
            raise NotImplementedError

    with raw_connection() as (conn, peer, requests):
        loop = NoReaders()
        try:
            out = loop.run_until_complete(asyncio.wait_for(echo_many(conn, 1000, 20, []), 20))
        finally:
            loop.close()
        assert out == list(range(1000))
        assert NoReaders.refused == 1  # once: it is not offered the role again
        assert conn.reader._state == "reading"


# ---- when the loop must not keep the role -----------------------------------------


@pytest.mark.timeout(60)
def test_a_keyboard_interrupt_while_the_loop_reads_does_not_strand_the_role():
    """Ctrl-C (a KeyboardInterrupt raised in Python code the read runs, e.g. the
    loop's call_soon when a reply wakes its caller) while a caller's loop reads:
    the role must not stay marked as being read by that loop, or no one reads again
    (the standby and every other caller wait for a read that never ends)."""
    with raw_connection() as (conn, peer, requests):
        loop, anchor = stopped_holding_the_role(conn)
        reader = conn.reader
        on_event = reader.on_event
        main = threading.current_thread()
        raised = []

        def interrupted(event):
            if not raised and reader._loop_reading and threading.current_thread() is main:
                raised.append(event)
                raise KeyboardInterrupt
            on_event(event)

        reader.on_event = interrupted
        try:
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(_rpc.acall(conn, "echo", ("x",), {}, None))
        finally:
            reader.on_event = on_event
        assert raised
        # Another caller must get its reply: a thread's call with a deadline, then one without.
        assert _rpc.call(conn, "echo", ("after",), {}, 5) == "after"
        result: list = []
        thread = threading.Thread(target=lambda: result.append(_rpc.call(conn, "echo", ("lead",), {}, None)),
                                  daemon=True)
        thread.start()
        thread.join(5)
        assert result == ["lead"]
        loop.close()


@pytest.mark.timeout(60)
def test_a_loop_whose_last_call_is_cancelled_gives_the_role_back():
    """asyncio.run cancels the tasks left pending (an acall among them) and closes its
    loop: with no call of its own left, the loop must not keep the role, or what the
    peer sends (a request, a keepalive) waits for the standby."""
    with raw_connection() as (conn, peer, requests):
        async def run():
            loop = asyncio.get_running_loop()
            asyncio.ensure_future(_rpc.acall(conn, "wait", (), {}, None))  # left pending
            await echo_many(conn, 400, 20, [])
            await asyncio.sleep(0)
            assert on_loop(conn, loop), conn.reader._state
            return loop

        loop = asyncio.run(run())
        assert loop.is_closed() and not conn.calls
        peer.send(2, _wire.MTYPE_REQUEST, ("Svc.m", (), {}))  # a request of the peer's
        assert wait_for(lambda: requests, 5), (conn.reader._state, conn.reader._role_loop)


@pytest.mark.timeout(60)
def test_an_acall_timing_out_last_gives_the_role_back():
    """The loop's last call times out: the loop goes on (here blocked in user code);
    the role must go back to a reader thread so the peer's request is read."""
    with raw_connection() as (conn, peer, requests):
        async def run():
            loop = asyncio.get_running_loop()
            waiting = asyncio.ensure_future(_rpc.acall(conn, "wait", (), {}, 0.5))
            await echo_many(conn, 400, 20, [])
            await asyncio.sleep(0)
            assert on_loop(conn, loop), conn.reader._state
            with pytest.raises(TimeoutError):
                await waiting
            assert not conn.calls
            peer.send(2, _wire.MTYPE_REQUEST, ("Svc.m", (), {}))
            return bool(wait_for(lambda: requests, 5))  # blocks the loop: user code that computes

        assert asyncio.run(run()), "the peer's request was not read"


@pytest.mark.timeout(60)
def test_a_stopped_loop_is_not_given_the_role():
    """run_until_complete returned with acall tasks still pending: a reply to one of
    them must not hand the role to the stopped loop, which cannot read."""
    with raw_connection() as (conn, peer, requests):
        loop = asyncio.new_event_loop()

        async def start():
            tasks = [asyncio.ensure_future(_rpc.acall(conn, "wait", (i,), {}, None)) for i in range(2)]
            await asyncio.sleep(0.05)  # both sent
            return tasks

        tasks = loop.run_until_complete(start())
        assert not loop.is_running() and len(conn.calls) == 2
        first = min(conn.calls)
        peer.send(first, _wire.MTYPE_REPLY, "late")  # a reply for the stopped loop
        assert wait_for(lambda: len(conn.calls) == 1, 5)
        peer.send(2, _wire.MTYPE_REQUEST, ("Svc.m", (), {}))
        try:
            assert wait_for(lambda: requests, 5), (conn.reader._state, conn.reader._role_loop is loop)
        finally:
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()


@pytest.mark.timeout(60)
def test_a_streams_items_are_read_by_a_reader_thread_not_its_loop():
    """A stream's items come at the producer's pace: a reader thread reading them
    while the loop handles the last keeps the producer going (the loop reading
    them cost a fifth of `astream`'s items/s)."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        reader = m.connection().reader

        async def run():
            loop, held, items = asyncio.get_running_loop(), 0, []
            async for item in m.astream("Echo.count", 3000):
                items.append(item)
                held += reader._state == ON_LOOP and reader._role_loop is loop
            return items, held

        items, held = asyncio.run(run())
        assert items == list(range(3000))
        assert held == 0


@pytest.mark.timeout(60)
def test_a_stream_begun_while_its_loop_holds_the_role_is_read_by_a_reader_thread():
    """The loop holds the role for its acalls (one still in flight) when it begins a
    stream: a reader thread reads the stream's items, as when the stream begins
    alone (the loop keeps the role while any call is in flight, so it would read
    every item of the stream otherwise)."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        reader = m.connection().reader

        async def run():
            loop = asyncio.get_running_loop()
            anchor = asyncio.ensure_future(m.acall("Echo.asleep", 5.0))
            for _ in range(200):
                await asyncio.gather(*(m.acall("Echo.echo", i) for i in range(20)))
                if reader._state == ON_LOOP and reader._role_loop is loop:
                    break
            assert reader._state == ON_LOOP and reader._role_loop is loop, reader._state
            held, items, conn = 0, [], m.connection()
            async for item in m.astream("Echo.count", 3000):
                items.append(item)
                in_flight = any(w.stream for w in list(conn.calls.values()))  # not its last items
                held += in_flight and reader._state == ON_LOOP and reader._role_loop is loop
            # The stream over, the loop's acalls (the anchor's among them) get the role again.
            for _ in range(200):
                await asyncio.gather(*(m.acall("Echo.echo", i) for i in range(20)))
                if reader._state == ON_LOOP and reader._role_loop is loop:
                    break
            assert reader._state == ON_LOOP and reader._role_loop is loop, reader._state
            await asyncio.wait_for(anchor, 30)
            return items, held

        items, held = asyncio.run(run())
        assert items == list(range(3000))
        assert held == 0, f"the loop held the role, the stream in flight, at {held} of 3000 items"
