"""A blocking caller reads its own reply (it *leads*, see _reader): the reading
role is never held by a caller that cannot read (one waiting for room to send),
nor stranded by an exception the caller meets after taking it (Ctrl-C).

The first test drives a real Connection whose peer is a raw socket speaking the
wire protocol by hand (tests.rawpeer), so that the peer can stop and start reading at will."""
from __future__ import annotations

import signal
import threading
import time

import pytest

import bigmachine as bm
from bigmachine import _rpc, _wire
from tests.rawpeer import raw_connection, wait_for
from tests.services import Echo


@pytest.mark.timeout(60)
def test_a_caller_waiting_for_room_does_not_hold_the_reading_role():
    """_rpc.call takes the role before a 'small' request whose pickle fits in
    SMALL_MESSAGE; its frame (with the 32-byte header) may not, and then send()
    waits for room with the role held and nobody reading: what the peer sends
    meanwhile (its requests, PONGs, replies) is not read, and last_recv goes stale
    (the driver's keepalive then declares a live machine lost)."""
    with raw_connection(max_queued=1 << 16) as (conn, peer, requests):
        # A few calls: the role ends up parked (a blocking caller wanted to lead).
        for i in range(3):
            assert _rpc.call(conn, "echo", (i,), {}, None) == i
        assert wait_for(lambda: conn.reader._state == "parked", 5), conn.reader._state
        # The peer stops reading; a large message to it fills the socket and queues.
        peer.reading.clear()
        conn.send(2, _wire.MTYPE_REPLY, 0, [b"r" * (8 << 20)], [False])
        assert conn.writer.queued > conn.writer.max_queued
        # A request whose pickle is just under SMALL_MESSAGE, its frame just over.
        arg = b"x" * 65480
        message = _rpc.encode_request("echo", (arg,), {})
        assert len(message[0]) == 1 and len(message[0][0]) <= _rpc.SMALL_MESSAGE
        result: list = []
        caller = threading.Thread(target=lambda: result.append(_rpc.call(conn, "echo", (arg,), {}, None)),
                                  daemon=True)
        caller.start()
        time.sleep(0.3)  # the caller now waits for room
        before = conn.last_recv
        peer.send(4, _wire.MTYPE_REQUEST, ("Echo.echo", (1,), {}))  # the peer calls us
        served = wait_for(lambda: requests == [4], 3)
        fresh = conn.last_recv > before
        peer.reading.set()  # let everything finish
        caller.join(20)
        assert result and result[0] == arg
        assert served and fresh, "the peer's request was not read while a caller waited for room"


# ---- a KeyboardInterrupt between try_lead and `leading = ...` ------------------------


@pytest.mark.timeout(60)
def test_keyboard_interrupt_right_after_taking_the_role_does_not_strand_it():
    """A signal handler that raises (Ctrl-C) runs at the first eval-breaker check
    after the compiled try_lead returns, before `leading` is assigned in _rpc.call:
    the finally clause then never calls leave(), the role stays 'reading' with no
    reader, and every later call on the connection times out."""

    def interrupt(*_):
        raise KeyboardInterrupt

    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        for i in range(3):
            assert m.call("Echo.echo", i) == i  # no deadline: the caller leads, then parks
        reader = m.connection().reader
        assert wait_for(lambda: reader._state == "parked", 5), reader._state
        previous = signal.signal(signal.SIGUSR1, interrupt)
        try:
            def hold_the_lock():
                with reader._lock:  # the caller blocks in try_lead...
                    time.sleep(0.3)
                    # ...and the signal is tripped (on this thread: the main one is
                    # not interrupted) before it gets the lock.
                    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

            helper = threading.Thread(target=hold_the_lock)
            helper.start()
            time.sleep(0.05)
            with pytest.raises(KeyboardInterrupt):
                m.call("Echo.echo", 1)
            helper.join(5)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert m.call("Echo.echo", 2, timeout=5) == 2


# ---- what a leader's thread belongs to after it read a peer's request ----------------


@pytest.mark.timeout(60)
def test_a_caller_that_leads_and_reads_a_peers_request_keeps_its_own_node():
    """Dispatcher.on_request makes its node current on the thread that reads a
    request (for a reader thread, for good) and never gives that thread's own
    back. A blocking caller that leads reads the peer's requests as well: after
    its call, the caller's thread belongs to the connection's node
    (bigmachine.current(), Machines unpickled there), whatever it belonged to
    before. (As before 5f6d3ca, which only inlined Node._enter.)"""
    from types import SimpleNamespace

    from bigmachine._dispatch import Dispatcher
    from bigmachine._pool import Pool
    from bigmachine._service import Registry
    from bigmachine._threadstate import thread_state

    connections_node = SimpleNamespace(name="the connection's node")
    callers_node = SimpleNamespace(name="the caller's node")
    registry = Registry()
    registry.add("Echo", Echo())
    pool = Pool(2, "review-pool")
    try:
        with raw_connection() as (conn, peer, requests):
            conn.on_request = Dispatcher(registry, pool, conn.loop, connections_node).on_request
            for i in range(3):
                assert _rpc.call(conn, "echo", (i,), {}, None) == i
            assert wait_for(lambda: conn.reader._state == "parked", 5), conn.reader._state
            seen: list = []

            def caller():
                thread_state().node = callers_node
                seen.append(_rpc.call(conn, "wait", (), {}, None))  # the raw peer answers only echo
                seen.append(thread_state().node)

            thread = threading.Thread(target=caller, daemon=True)
            thread.start()
            assert wait_for(lambda: conn.reader._leader is not None and conn.calls, 5), "no leader"
            sid, = conn.calls
            peer.send(2, _wire.MTYPE_REQUEST, ("Echo.echo", (5,), {}))  # the peer calls us...
            peer.send(sid, _wire.MTYPE_REPLY, "done")                   # ...then answers the call
            thread.join(20)
            assert not thread.is_alive()
            assert seen[0] == "done"
            assert seen[1] is callers_node, f"the caller's thread now belongs to {seen[1].name}"
    finally:
        pool.shutdown()
