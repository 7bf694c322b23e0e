"""The write scheduler (_writer): a thread's corked small messages."""
from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from bigmachine import _buffers, _decoder, _wire
from bigmachine._connection import Connection
from bigmachine._serialize import dumps, loads
from bigmachine._writer import CORK_FLUSH, SMALL_MESSAGE, Writer
from bigmachine.errors import MachineLost

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair():
    """A Writer on one end of a socket pair, and a decoder reading the other end."""
    ours, theirs = socket.socketpair()
    loop = asyncio.new_event_loop()
    writer = Writer(ours, loop, None, lambda what, exc: MachineLost("peer", f"{what}: {exc}"),
                    lambda: MachineLost("peer", "closed"), 1 << 20)
    theirs.setblocking(False)
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=1 << 20, max_pending=4 << 20)
    yield writer, theirs, decoder
    writer.close()
    theirs.close()
    loop.close()


def _send(writer: Writer, sid: int) -> None:
    units, nbytes = _wire.message_frames(sid, _wire.MTYPE_REPLY, 0, [b"reply %d" % sid])
    writer.enqueue(sid, units, nbytes, cork=True)


def _arrived(theirs: socket.socket, decoder: _decoder.Decoder) -> list:
    """The stream ids of the messages readable now, in order."""
    sids = []
    while True:
        try:
            n = theirs.recv_into(decoder.get_buffer())
        except BlockingIOError:
            return sids
        sids += [event[1] for event in decoder.buffer_updated(n) if event[0] == _wire.KIND_MSG]


def test_corked_messages_go_out_cork_flush_at_a_time_and_the_rest_at_uncork(pair):
    writer, theirs, decoder = pair
    assert writer.cork()
    for sid in range(1, CORK_FLUSH):
        _send(writer, sid)
    assert _arrived(theirs, decoder) == [], "corked messages went out before the batch was full"
    _send(writer, CORK_FLUSH)
    assert _arrived(theirs, decoder) == list(range(1, CORK_FLUSH + 1))
    _send(writer, CORK_FLUSH + 1)
    _send(writer, CORK_FLUSH + 2)
    assert _arrived(theirs, decoder) == []
    writer.uncork()
    assert _arrived(theirs, decoder) == [CORK_FLUSH + 1, CORK_FLUSH + 2]


def test_a_message_that_cannot_wait_sends_what_was_corked_first(pair):
    writer, theirs, decoder = pair
    assert writer.cork()
    _send(writer, 1)
    units, nbytes = _wire.message_frames(2, _wire.MTYPE_REPLY, 0, [b"not corked"])
    writer.enqueue(2, units, nbytes, cork=False)
    assert _arrived(theirs, decoder) == [1, 2]
    writer.uncork()
    assert _arrived(theirs, decoder) == []


def test_enqueue_in_turn_corks_once_and_holds_the_turns_messages_until_uncork(pair):
    writer, theirs, decoder = pair
    units, nbytes = _wire.message_frames(1, _wire.MTYPE_REQUEST, 0, [b"first"])
    assert writer.enqueue_in_turn(1, units, nbytes), "the first message of a turn corks the writer"
    units, nbytes = _wire.message_frames(3, _wire.MTYPE_REQUEST, 0, [b"second"])
    assert not writer.enqueue_in_turn(3, units, nbytes), "the cork was already this thread's"
    assert _arrived(theirs, decoder) == []
    writer.uncork()
    assert _arrived(theirs, decoder) == [1, 3]


def test_enqueue_in_turn_first_now_sends_the_turns_first_message_and_holds_the_rest(pair):
    writer, theirs, decoder = pair
    units, nbytes = _wire.message_frames(2, _wire.MTYPE_REPLY, 0, [b"first"])
    assert writer.enqueue_in_turn(2, units, nbytes, None, True)
    assert _arrived(theirs, decoder) == [2], "the turn's first answer waited"
    units, nbytes = _wire.message_frames(4, _wire.MTYPE_REPLY, 0, [b"second"])
    assert not writer.enqueue_in_turn(4, units, nbytes, None, True)
    assert _arrived(theirs, decoder) == [], "the turn's later answers did not wait for its end"
    writer.uncork()
    assert _arrived(theirs, decoder) == [4]


def test_enqueue_in_turn_sends_at_once_while_another_thread_holds_the_cork(pair):
    writer, theirs, decoder = pair
    took = []
    thread = threading.Thread(target=lambda: took.append(writer.cork()))
    thread.start()
    thread.join(10)
    assert took == [True]
    units, nbytes = _wire.message_frames(1, _wire.MTYPE_REQUEST, 0, [b"not held"])
    assert not writer.enqueue_in_turn(1, units, nbytes)
    assert _arrived(theirs, decoder) == [1]


def test_enqueue_in_turn_on_a_closed_writer_raises_and_takes_no_cork(pair):
    writer, theirs, decoder = pair
    writer.close()
    units, nbytes = _wire.message_frames(1, _wire.MTYPE_REQUEST, 0, [b"late"])
    with pytest.raises(MachineLost):
        writer.enqueue_in_turn(1, units, nbytes)
    assert writer.cork() is True, "the failed send kept the cork"


def _on_a_connection(body, **options):
    """await body(conn, theirs) on a Connection over a Unix socket pair; theirs is
    the peer's end, non-blocking, read only if body reads it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)

    async def main():
        conn = Connection(ours, asyncio.get_running_loop(), "peer", True, lambda *args: None,
                          lambda conn: None, **options)
        try:
            return await body(conn, theirs)
        finally:
            conn.fail(MachineLost("peer", "test over"))

    try:
        return asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        theirs.close()


def test_send_in_turn_sends_small_messages_when_the_turn_ends_and_leaves_large_ones_to_asend():
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=1 << 20, max_pending=4 << 20)

    async def body(conn, theirs):
        loop = asyncio.get_running_loop()
        sids = [conn.new_call(False, loop)[0] for _ in range(3)]  # calls in flight
        assert conn.send_in_turn(sids[0], _wire.MTYPE_REQUEST, 0, *dumps("a"))
        assert conn.send_in_turn(sids[1], _wire.MTYPE_REQUEST, 0, *dumps("b"))
        assert _arrived(theirs, decoder) == [], "sent before the loop's turn ended"
        large = dumps(b"x" * (SMALL_MESSAGE + 1))
        assert not conn.send_in_turn(sids[2], _wire.MTYPE_REQUEST, 0, *large)
        assert _arrived(theirs, decoder) == [], "a message send_in_turn refused went out"
        await asyncio.sleep(0)
        assert _arrived(theirs, decoder) == sids[:2]

    _on_a_connection(body)


def test_send_in_turn_sends_the_request_of_a_call_made_alone_at_once():
    # One call at a time (a ping from a coroutine): no other request will join
    # it this turn, so it does not wait for the turn's end.
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=1 << 20, max_pending=4 << 20)

    async def body(conn, theirs):
        loop = asyncio.get_running_loop()
        sid, _ = conn.new_call(False, loop)
        assert conn.send_in_turn(sid, _wire.MTYPE_REQUEST, 0, *dumps("alone"))
        assert _arrived(theirs, decoder) == [sid], "a call made alone waited for the turn's end"
        more, _ = conn.new_call(False, loop)  # the first still in flight: this one waits
        assert conn.send_in_turn(more, _wire.MTYPE_REQUEST, 0, *dumps("second"))
        assert _arrived(theirs, decoder) == []
        await asyncio.sleep(0)
        assert _arrived(theirs, decoder) == [more]

    _on_a_connection(body)


def test_a_loop_closed_before_its_uncork_ran_does_not_strand_the_next_loops_messages():
    # send_in_turn corks the writer for the thread and leaves the uncork to the
    # end of the loop's turn. A loop stopped and closed within that turn never
    # ran it: the thread kept the cork, and the next loop on the thread corked
    # its messages under it with no uncork to come (an acall waited for ever).
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=1 << 20, max_pending=4 << 20)
    io = asyncio.new_event_loop()
    conn = Connection(ours, io, "peer", True, lambda *args: None, lambda conn: None)
    try:
        async def send_and_stop():
            assert conn.send_in_turn(1, _wire.MTYPE_REQUEST, 0, *dumps("a"))
            asyncio.get_running_loop().stop()  # the loop ends with this turn

        first = asyncio.new_event_loop()
        first.create_task(send_and_stop())
        first.run_forever()
        first.close()

        async def send_again():
            assert conn.send_in_turn(3, _wire.MTYPE_REQUEST, 0, *dumps("b"))
            got = []
            for _ in range(200):
                await asyncio.sleep(0.01)
                got += _arrived(theirs, decoder)
                if len(got) == 2:
                    break
            return got

        assert asyncio.run(asyncio.wait_for(send_again(), 10)) == [1, 3]
    finally:
        conn.fail(MachineLost("peer", "test over"))
        io.close()
        theirs.close()


def _stream_7_as_the_peer_reads_it(send) -> list:
    """Run send(conn) on a Connection's loop while its peer does not read, then read:
    stream 7's first three messages as the peer decodes them, [(mtype, value)]
    (a bytes value as its length)."""
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=64 << 20, max_pending=64 << 20)

    async def body(conn, theirs):
        await send(conn)
        loop = asyncio.get_running_loop()
        got = []
        deadline = loop.time() + 20
        while loop.time() < deadline and len(got) < 3:
            try:
                n = theirs.recv_into(decoder.get_buffer())
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            for event in decoder.buffer_updated(n):
                if event[0] == _wire.KIND_MSG and event[1] == 7:
                    value = loads(event[4])
                    got.append((event[2], len(value) if isinstance(value, bytes) else value))
        return got

    return _on_a_connection(body)


async def _backlog(conn) -> None:
    """A large reply on stream 99 that waits in the writer's queue (the peer reads
    slower than we write)."""
    await conn.asend(99, _wire.MTYPE_REPLY, 0, *dumps(b"x" * (8 << 20)))
    assert conn.writer.queued > 0, "no backlog: the test does not test anything"


ITEM, END = _wire.MTYPE_ITEM, _wire.MTYPE_END


@pytest.mark.parametrize("end_in_its_own_turn", [False, True])
def test_an_async_streams_items_and_end_keep_their_order_behind_a_backlog(end_in_its_own_turn):
    # As _dispatch._run_async_generator sends them: an item a loop turn, the last
    # item and END in one turn. With the first message of a turn sent uncorked
    # (994c6e5, reverted), item 2 joined stream 7's own queue and END the corked
    # batches' queue; the IO loop drains queues in turn, so END went out first
    # and the caller, done at END, dropped item 2.
    async def send(conn):
        await _backlog(conn)
        await conn.asend(7, ITEM, 0, *dumps(1))
        await asyncio.sleep(0)
        await conn.asend(7, ITEM, 0, *dumps(2))
        if end_in_its_own_turn:
            await asyncio.sleep(0)
        await conn.asend(7, END, 0, *dumps(None))

    assert _stream_7_as_the_peer_reads_it(send) == [(ITEM, 1), (ITEM, 2), (END, None)]


def test_small_items_after_a_large_one_on_the_same_stream_wait_for_it_to_finish():
    # A small message corked while a large one of its stream was still queued
    # went to the corked batches' queue, which the IO loop wrote between the
    # large one's frames: the peer saw a second message begin on stream 7
    # (WireError) and the connection failed.
    async def send(conn):
        await conn.asend(7, ITEM, 0, *dumps(b"x" * (8 << 20)))
        assert conn.writer.queued > 0
        await conn.asend(7, ITEM, 0, *dumps(1))
        await conn.asend(7, END, 0, *dumps(None))

    assert _stream_7_as_the_peer_reads_it(send) == [(ITEM, 8 << 20), (ITEM, 1), (END, None)]


def test_a_large_message_waits_behind_its_streams_small_one_in_a_queued_corked_batch():
    # Stream 7's small item went out in a corked batch that had to queue behind a
    # backlog, after another batch; its next, large item got a queue of its own,
    # which the IO loop wrote in turn with the batches': the large item began
    # before the small one had gone out.
    async def send(conn):
        await _backlog(conn)
        await conn.asend(5, _wire.MTYPE_REPLY, 0, *dumps("another stream's"))
        await asyncio.sleep(0)  # its batch queues behind the backlog
        await conn.asend(7, ITEM, 0, *dumps("small"))
        await asyncio.sleep(0)  # and this one behind it
        await conn.asend(7, ITEM, 0, *dumps(b"y" * (2 << 20)))
        await conn.asend(7, END, 0, *dumps(None))

    assert _stream_7_as_the_peer_reads_it(send) == [(ITEM, "small"), (ITEM, 2 << 20), (END, None)]


def test_a_small_message_with_a_buffer_does_not_wait_for_room_when_shared_memory_is_on():
    # Small messages never wait for room (the in-flight gate bounds them). With
    # shared memory on (a Unix socket between two processes of a host),
    # send_in_turn refused every message of more than one segment, small or not,
    # and asend then awaited room for it (1facda9): a 1 KiB reply carrying an
    # out-of-band buffer waited behind the peer's backlog.
    async def body(conn, theirs):
        await conn.asend(99, _wire.MTYPE_REPLY, 0, *dumps(b"x" * (8 << 20)))
        assert conn.over_room(), "no backlog: the test does not test anything"
        conn.shm = True  # as a Connection to a machine on this host with shared_memory
        small = dumps(memoryview(bytearray(1000)))
        assert len(small[0]) == 2, "the buffer did not travel out of band"
        try:
            await asyncio.wait_for(conn.asend(7, ITEM, 0, *small), 2)
        except asyncio.TimeoutError:
            pytest.fail("a small message waited for room")

    _on_a_connection(body, max_queued=1 << 20)


@pytest.mark.parametrize("how", ["enqueue", "enqueue_in_turn"])
def test_a_truncating_fault_closes_the_descriptors_of_the_message_it_cuts(pair, monkeypatch, how):
    # The writer owns a message's descriptors from enqueue on: "sent or dropped,
    # closed here". ce10ba2 gave enqueue_in_turn descriptors (asend's small
    # shared-memory messages) and closes them when the injector DROPs the
    # message, but a TRUNCATE raises out of _inject before _close(fds): each
    # leaks (enqueue has had the same gap). Test-only (BIGMACHINE_FAULTS).
    from bigmachine import _faults
    writer, theirs, decoder = pair
    monkeypatch.setattr(_faults, "FAULTS", _faults.FaultInjector("truncate=1"))
    fd = os.memfd_create("review-truncated")
    try:
        units, nbytes = _wire.message_frames(1, _wire.MTYPE_REQUEST, 0, [b"with a descriptor"])
        with pytest.raises(MachineLost):
            getattr(writer, how)(1, units, nbytes, fds=[fd])
        try:
            still_ours = os.readlink(f"/proc/self/fd/{fd}") == "/memfd:review-truncated (deleted)"
        except OSError:
            still_ours = False
        assert not still_ours, "the truncated message's descriptor was left open"
    finally:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:review-truncated"):
                os.close(fd)
        except OSError:
            pass
