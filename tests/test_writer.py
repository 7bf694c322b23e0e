"""The write scheduler (_writer): a thread's corked small messages."""
from __future__ import annotations

import asyncio
import socket

import pytest

from bigmachine import _buffers, _decoder, _wire
from bigmachine._connection import Connection
from bigmachine._serialize import dumps, loads
from bigmachine._writer import CORK_FLUSH, Writer
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


def _run_stream_behind_a_backlog(items_then_end_in_one_turn: bool) -> list:
    """An async generator's replies on stream 7 (as _dispatch._run_async_generator
    sends them: one item per loop turn, the last item and END in the same turn)
    while a large reply on stream 99 still waits in the writer's queue (a peer
    reading slower than we write). Returns stream 7's messages as the peer
    decodes them: [(mtype, value), ...]."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=64 << 20, max_pending=64 << 20)

    async def main():
        loop = asyncio.get_running_loop()
        conn = Connection(ours, loop, "peer", True, lambda *args: None, lambda conn: None)
        try:
            await conn.asend(99, _wire.MTYPE_REPLY, 0, *dumps(b"x" * (8 << 20)))
            assert conn.writer.queued > 0, "no backlog: the test does not test anything"
            # turn 1: item 1 (first of its turn: uncorked, queued behind the backlog)
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps(1))
            await asyncio.sleep(0)
            # turn 2: item 2 (first of its turn), then END in the same turn (corked)
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps(2))
            if not items_then_end_in_one_turn:
                await asyncio.sleep(0)
            await conn.asend(7, _wire.MTYPE_END, 0, *dumps(None))
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
                        got.append((event[2], loads(event[4])))
            return got
        finally:
            conn.fail(MachineLost("peer", "test over"))

    try:
        return asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        theirs.close()


def test_the_last_item_of_an_async_stream_arrives_before_its_end_behind_a_backlog():
    # With the first message of a turn sent uncorked (994c6e5, reverted), item 2
    # joined stream 7's own queue and END the corked batch's; the IO loop drains
    # queues in turn, so END went out first and the caller dropped item 2.
    got = _run_stream_behind_a_backlog(items_then_end_in_one_turn=True)
    assert got == [(_wire.MTYPE_ITEM, 1), (_wire.MTYPE_ITEM, 2), (_wire.MTYPE_END, None)]


def test_the_same_stream_with_its_end_in_a_turn_of_its_own():
    got = _run_stream_behind_a_backlog(items_then_end_in_one_turn=False)
    assert got == [(_wire.MTYPE_ITEM, 1), (_wire.MTYPE_ITEM, 2), (_wire.MTYPE_END, None)]


def test_small_items_after_a_large_one_on_the_same_stream_wait_for_it_to_finish():
    # A small message corked while a large one of its stream was still queued
    # went to the corked batch's queue, which the IO loop wrote between the
    # large one's frames: the peer saw a second message begin on stream 7
    # (WireError) and the connection failed.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=64 << 20, max_pending=64 << 20)

    async def main():
        loop = asyncio.get_running_loop()
        conn = Connection(ours, loop, "peer", True, lambda *args: None, lambda conn: None)
        try:
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps(b"x" * (8 << 20)))
            assert conn.writer.queued > 0
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps(1))
            await conn.asend(7, _wire.MTYPE_END, 0, *dumps(None))
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
                        got.append(event[2])
            return got
        finally:
            conn.fail(MachineLost("peer", "test over"))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        theirs.close()
    assert got == [_wire.MTYPE_ITEM, _wire.MTYPE_ITEM, _wire.MTYPE_END]


def test_a_large_message_waits_behind_its_streams_small_one_in_a_queued_corked_batch():
    # Stream 7's small item went out in a corked batch that had to queue behind a
    # backlog, after another batch; its next, large item got a queue of its own,
    # which the IO loop wrote in turn with the batches': the large item began
    # before the small one had gone out.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    decoder = _decoder.Decoder(alloc=_buffers.aligned, max_message=64 << 20, max_pending=64 << 20)

    async def main():
        loop = asyncio.get_running_loop()
        conn = Connection(ours, loop, "peer", True, lambda *args: None, lambda conn: None)
        try:
            await conn.asend(99, _wire.MTYPE_REPLY, 0, *dumps(b"x" * (8 << 20)))
            assert conn.writer.queued > 0, "no backlog: the test does not test anything"
            await conn.asend(5, _wire.MTYPE_REPLY, 0, *dumps("another stream's"))
            await asyncio.sleep(0)  # its batch queues behind the backlog
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps("small"))
            await asyncio.sleep(0)  # and this one behind it
            await conn.asend(7, _wire.MTYPE_ITEM, 0, *dumps(b"y" * (2 << 20)))
            await conn.asend(7, _wire.MTYPE_END, 0, *dumps(None))
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
                        got.append(len(value) if isinstance(value, bytes) else value)
            return got
        finally:
            conn.fail(MachineLost("peer", "test over"))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        theirs.close()
    assert got == ["small", 2 << 20, None]
