"""Races and failure paths between the reader thread, callers and event loops
(each found by a review with a reproduction; each must stay fixed)."""
from __future__ import annotations

import asyncio
import glob
import socket
import sys
import threading
import time

import pytest

import bigmachine as bm
from bigmachine._waiters import Gate, begin_batch, call_soon_threadsafe, end_batch, mark_loop_thread
from tests.conftest import poll
from tests.services import CustomError, Echo, LoopCaller, Relay


class _PreemptedDict(dict):
    """Calls table whose lookups pause once: the reader loses the CPU there."""

    armed = True

    def _pause(self):
        if self.armed:
            self.armed = False
            time.sleep(0.05)

    def get(self, key, default=None):
        value = dict.get(self, key, default)
        if value is not None:
            self._pause()
        return value

    def pop(self, key, *default):
        self._pause()
        return dict.pop(self, key, *default)


def test_reply_racing_its_calls_timeout_leaves_the_connection_working():
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        conn = m.connection()
        conn.calls = _PreemptedDict(conn.calls)
        with pytest.raises(TimeoutError):
            m.call("Echo.sleep", 0.01, timeout=0.02)
        time.sleep(0.2)
        assert conn.reader.is_alive() and not conn.closed
        assert m.call("Echo.echo", 42, timeout=5) == 42


def test_a_closed_loops_state_waiter_does_not_stop_callers_learning_of_loss():
    with bm.start(bm.InProcess(), keepalive_period=0.25) as b:
        m, = b.start(1, services={"Echo": Echo()})

        async def peek():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(m.await_state(bm.State.STOPPED), 0.1)

        asyncio.run(peek())  # that loop is closed now
        conn = m.connection()
        errors = []
        caller = threading.Thread(target=lambda: errors.append(
            pytest.raises(bm.MachineLost, m.call, "Echo.sleep", 3)))
        caller.start()
        time.sleep(0.3)
        conn.sock.shutdown(socket.SHUT_RDWR)
        caller.join(2)
        assert not caller.is_alive() and errors and not conn.calls
        # a broken link is re-dialled (the machine lives on) ...
        assert m.call("Echo.echo", 1, timeout=5) == 1 and m.state == bm.State.RUNNING
        # ... and a machine that dies is STOPPED, whatever closed loops wait on it
        b.system.kill(m)
        assert m.wait(bm.State.STOPPED, timeout=5) == bm.State.STOPPED


def test_async_generator_called_with_wrong_arguments_fails_the_stream():
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        t = time.monotonic()
        with pytest.raises(TypeError):
            list(m.stream("Echo.acount", 1, 2, 3, timeout=5))
        assert time.monotonic() - t < 2
        # The machine forgets the stream once its error is sent: only the stats call is open.
        poll(lambda: m.stats()["open_calls"] == 1, timeout=5)


def test_gate_passes_on_a_wakeup_its_cancelled_waiter_got():
    async def main():
        gate = Gate(1)
        await gate.aacquire()
        first = asyncio.create_task(gate.aacquire())
        second = asyncio.create_task(gate.aacquire())
        await asyncio.sleep(0.01)
        gate.release()   # hands the slot to `first`...
        first.cancel()   # ...whose caller gives up before it runs
        await asyncio.wait_for(second, 2)

    asyncio.run(main())


def test_gate_never_lets_more_than_its_limit_in_and_never_strands_a_waiter():
    # Places are taken and given back without the lock while there is room;
    # threads and coroutines that wait must still be woken by every release,
    # and the count must never pass the limit.
    gate, limit = Gate(3), 3
    peak, errors = [0], []

    def hold():
        peak[0] = max(peak[0], gate.used)
        if gate.used > limit:
            errors.append(gate.used)

    def thread_worker():
        try:
            for i in range(2000):
                if i % 2 or not gate.try_acquire():
                    gate.acquire(10)  # a missed wake-up: TimeoutError
                hold()
                gate.release()
        except BaseException as exc:
            errors.append(exc)

    async def loop_worker():
        for _ in range(2000):
            if not gate.try_acquire():
                await gate.aacquire()
            hold()
            await asyncio.sleep(0)
            gate.release()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(loop_worker() for _ in range(4))), 60)

    threads = [threading.Thread(target=thread_worker) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as it will go
    try:
        for thread in threads:
            thread.start()
        asyncio.run(main())
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and peak[0] == limit
    assert gate.used == 0 and gate.waiting == 0


def test_gate_acquire_times_out_when_no_place_comes_free():
    gate = Gate(1)
    gate.acquire(None)
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        gate.acquire(0.05)
    assert 0.04 < time.monotonic() - t < 5
    assert gate.used == 1 and gate.waiting == 0
    gate.release()
    gate.acquire(0.05)


@pytest.mark.parametrize("reader", ["another thread", "the loop itself"])
def test_a_batched_wake_up_that_raises_does_not_lose_the_rest_of_its_batch(reader):
    # A read's loop wake-ups go to the loop as one batch (_waiters.end_batch).
    # One that raised ended the batch: the wake-ups after it (other calls'
    # replies) never ran, and their callers waited for ever.
    errors, woken = [], []

    def fail():
        raise RuntimeError("a broken callback")

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: errors.append(context["exception"]))
        done = loop.create_future()

        def read():
            pending = begin_batch()
            call_soon_threadsafe(loop, woken.append, 1)
            call_soon_threadsafe(loop, fail)
            call_soon_threadsafe(loop, woken.append, 2)
            call_soon_threadsafe(loop, done.set_result, None)
            end_batch(pending)

        if reader == "the loop itself":
            mark_loop_thread(loop)
            try:
                read()
            finally:
                mark_loop_thread(None)
        else:
            thread = threading.Thread(target=read)
            thread.start()
            thread.join(10)
        await asyncio.wait_for(done, 10)

    asyncio.run(main())
    assert woken == [1, 2]
    assert [str(e) for e in errors] == ["a broken callback"]


def test_a_call_cancelled_before_its_task_first_ran_is_ended():
    """The caller's cancel may reach the loop between the last look at the call
    before its task is made and the task's first step: the task is cancelled
    unstarted, and its body, whose finally ends the call, never runs. The call
    must end all the same, or it stays counted in flight (and max_in_flight
    such calls fail the connection)."""
    from bigmachine import _dispatch
    from tests.rawpeer import raw_connection, wait_for

    async def method():
        return 1

    done = threading.Event()
    with raw_connection() as (conn, peer, requests):
        def start_then_cancel():
            served = _dispatch.Served(conn, 41, conn.loop)
            conn.incoming[41] = served
            _dispatch._start_task((served, "T.method", _dispatch._run_async, method, (), {}), False)
            served.stream.cancel()  # read on a reader thread just now...
            served._cancel_task()   # ...and its callback ran before the task's first step
            done.set()

        conn.loop.call_soon_threadsafe(start_then_cancel)
        assert done.wait(5)
        assert wait_for(lambda: 41 not in conn.incoming, 5), "the cancelled call never ended"


def test_a_connection_failing_after_a_served_calls_loop_closed_cancels_every_call():
    """Connection.fail cancels each call it serves; one whose node's loop has
    already closed (a connection failing late in a shutdown) must not raise
    there, leaving the calls after it uncancelled (a generator's thread
    waiting for credit for ever)."""
    from bigmachine import _dispatch
    from tests.rawpeer import raw_connection

    closed = asyncio.new_event_loop()
    closed.close()
    with raw_connection() as (conn, peer, requests):
        first = conn.incoming[41] = _dispatch.Served(conn, 41, closed)
        second = conn.incoming[43] = _dispatch.Served(conn, 43, conn.loop)
        conn.fail(bm.MachineLost("rawpeer", "shutting down"))
        assert first.cancelled and second.cancelled


def test_blocking_call_on_the_io_loop_is_refused_clearly():
    with bm.start(bm.InProcess()) as b:
        m0, m1 = b.start(2, services={"Echo": Echo(), "LoopCaller": LoopCaller(), "Relay": Relay()})
        m0.call("Relay.via_addr", m1.addr, "Echo.echo", 1, timeout=5)  # m0 already holds a connection
        with pytest.raises(bm.Error, match="on the IO loop"):
            m0.call("LoopCaller.blocking_call", m1.addr, timeout=10)


def test_handles_of_a_shut_down_session_raise_typed_errors():
    with bm.start(bm.InProcess()) as other:
        target, = other.start(1, services={"Echo": Echo()})
        b = bm.start(bm.InProcess())
        handle = b.dial(target.addr)
        b.shutdown()
        with pytest.raises(bm.MachineLost):
            handle.call("Echo.echo", 1, timeout=5)
        with pytest.raises(bm.Error):
            b.dial(target.addr)


def test_an_in_process_machine_that_stops_drops_the_connections_peers_made():
    with bm.start(bm.InProcess(), keepalive_period=0.25) as b:
        m0, m1 = b.start(2, services={"Echo": Echo(), "Relay": Relay()})
        assert m0.call("Relay.via_addr", m1.addr, "Echo.echo", 5, timeout=5) == 5
        m1.call("Supervisor.shutdown", token=b.node.creds.owner_token(m1.name), timeout=5)
        m1.wait(bm.State.STOPPED, timeout=5)
        t = time.monotonic()
        with pytest.raises(bm.MachineLost):
            m0.call("Relay.via_addr", m1.addr, "Echo.echo", 5, timeout=10)
        assert time.monotonic() - t < 3


def test_the_reading_role_moves_between_loop_and_threads_with_the_work():
    """Async requests make the loop read the connection, sync ones hand reading
    back to a thread; mixed and concurrent calls all get their own replies."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        for i in range(50):
            assert m.call("Echo.aecho", i, timeout=5) == i
            assert m.call("Echo.echo", -i, timeout=5) == -i
            assert list(m.stream("Echo.acount", 3, timeout=5)) == [0, 1, 2]
            assert list(m.stream("Echo.count", 2, timeout=5)) == [0, 1]
            with pytest.raises(CustomError, match=f"no {i}"):
                m.call("Echo.afail", f"no {i}", timeout=5)
            assert m.call("Echo.asleep", 0.001, timeout=5) == 0.001

        async def mixed():
            calls = [m.acall("Echo.aecho" if i % 3 else "Echo.echo", i, timeout=10)
                     for i in range(300)]
            return await asyncio.gather(*calls)

        assert asyncio.run(mixed()) == list(range(300))
        conn = m.connection()
        assert conn.reader.is_alive() and not conn.closed


def test_a_loop_blocked_by_a_coroutine_does_not_hold_up_sync_calls():
    """The loop reads after async calls; a coroutine that blocks it must not stop
    the connection's sync calls: a reader thread takes reading back."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert m.call("Echo.aecho", 1, timeout=5) == 1  # the loop reads now
        blocked = []
        t = threading.Thread(target=lambda: blocked.append(m.call("Echo.ablock", "b", 2.0)))
        t.start()
        assert poll(lambda: m.call("Echo.event", "b", timeout=5) == "blocking")
        t0 = time.monotonic()
        assert m.call("Echo.echo", 7, timeout=5) == 7
        assert time.monotonic() - t0 < 1.0
        assert not blocked  # still blocking the loop
        t.join(10)
        assert blocked == [2.0]
        assert m.call("Echo.aecho", 2, timeout=5) == 2


def _voluntary_switches(pid: int) -> int:
    """Voluntary context switches of all pid's threads so far (each a wake-up)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def test_an_idle_machine_is_quiet_after_async_calls():
    """The loop reads after async calls; once they stop, nothing of it may keep
    waking the machine (users run many idle machines per core). Keepalives are
    5 s apart, so the 2 s measured see at most one."""
    with bm.start(bm.Local(keepalive_period=5.0, lost_after=5.0, lease=30.0)) as b:
        m, = b.start(1, services={"Echo": Echo()})
        pid = m.process.local_pid()
        for i in range(50):
            assert m.call("Echo.aecho", i, timeout=5) == i
        time.sleep(1.5)
        before = _voluntary_switches(pid)
        time.sleep(2.0)
        woken = _voluntary_switches(pid) - before
        assert woken < 10, f"an idle machine's threads were woken {woken} times in 2 s"
        assert m.call("Echo.aecho", 1, timeout=5) == 1


def test_a_cancel_of_its_own_task_while_its_reply_waits_for_room_still_answers():
    """Review of d4525ff: a method whose own task is cancelled must answer its caller.
    Here the cancel (a watchdog the method left set) lands after the method
    returned, while its large reply waits for the writer's room: the reply is
    not sent, and the call must still be answered (with an error), not left
    hanging."""
    from bigmachine import _dispatch, _wire
    from bigmachine._serialize import dumps
    from tests.rawpeer import raw_connection, wait_for

    answers = []

    class Recording:  # the raw peer's decoder, noting what arrives for sid 41
        def __init__(self, decoder):
            self.decoder = decoder

        def get_buffer(self):
            return self.decoder.get_buffer()

        def buffer_updated(self, n):
            events = self.decoder.buffer_updated(n)
            answers.extend(e[2] for e in events if e[0] == _wire.KIND_MSG and e[1] == 41)
            return events

    with raw_connection(max_queued=1) as (conn, peer, requests):
        peer.decoder = Recording(peer.decoder)
        peer.reading.clear()  # the caller is slow to read what we send it

        async def method():
            conn.send(99, _wire.MTYPE_REPLY, 0, *dumps(b"x" * (8 << 20)))  # others' replies
            assert conn.over_room()
            asyncio.get_running_loop().call_later(0.2, asyncio.current_task().cancel)
            return b"y" * 100_000  # large: its send awaits room

        def start():
            served = _dispatch.Served(conn, 41, conn.loop)
            conn.incoming[41] = served
            _dispatch._start_task((served, "T.method", _dispatch._run_async, method, (), {}), False)

        conn.loop.call_soon_threadsafe(start)
        time.sleep(0.6)  # the watchdog has fired
        peer.reading.set()
        assert wait_for(lambda: answers, 10), "the call was never answered"
        assert answers[0] in (_wire.MTYPE_ERROR, _wire.MTYPE_REPLY), answers
