"""The write scheduler (_writer): a thread's corked small messages."""
from __future__ import annotations

import asyncio
import socket

import pytest

from bigmachine import _buffers, _decoder, _wire
from bigmachine._writer import CORK_FLUSH, Writer
from bigmachine.errors import MachineLost

pytestmark = pytest.mark.timeout(30)


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
