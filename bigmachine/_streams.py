"""The state of one call's stream, on either end, without any IO.

A call is a stream of messages: a request, then (for a generator method)
items and an end, or a single reply or error. The caller grants the callee
credit as it consumes items, so a stream sends at most ``STREAM_WINDOW``
items ahead; either side may cancel. ``Stream`` keeps that bookkeeping and
says what to send; ``_rpc`` (the caller) and ``_dispatch`` (the callee) do
the sending and the waiting.
"""
from __future__ import annotations

from typing import Optional

from ._wire import MTYPE_END, MTYPE_ITEM

# Items a stream may send ahead of what the caller has consumed.
STREAM_WINDOW = 64

OPEN, ENDED, CANCELLED = "open", "ended", "cancelled"


class Stream:
    """One call's stream: open until it ends or is cancelled, with its credit."""

    __slots__ = ("sid", "state", "credits", "consumed")

    def __init__(self, sid: int):
        self.sid = sid
        self.state = OPEN
        self.credits = STREAM_WINDOW  # callee: items it may still send
        self.consumed = 0             # caller: items consumed and not yet credited

    @property
    def cancelled(self) -> bool:
        return self.state is CANCELLED

    @property
    def open(self) -> bool:
        return self.state is OPEN

    # ---- the caller's end ---------------------------------------------------

    def received(self, mtype: Optional[int]) -> bool:
        """Note a message that arrived; False if it ends the stream and carries no item.

        An error (or the connection's loss, mtype None) is the last message
        and is still delivered.
        """
        if mtype == MTYPE_END:
            self.state = ENDED
            return False
        if mtype != MTYPE_ITEM:
            self.state = ENDED
        return True

    def consumed_one(self) -> int:
        """Note an item the caller took; the credit to grant now (0: none yet)."""
        self.consumed += 1
        if self.consumed < STREAM_WINDOW // 2:
            return 0
        credit, self.consumed = self.consumed, 0
        return credit

    def close(self) -> bool:
        """The caller is done; True if the stream was still open (the callee must be told)."""
        if self.state != OPEN:
            return False
        self.state = CANCELLED
        return True

    # ---- the callee's end ---------------------------------------------------

    def credit(self, n: int) -> None:
        self.credits += n

    def sent_one(self) -> None:
        self.credits -= 1

    def cancel(self) -> None:
        """The caller gave up, or the connection closed."""
        if self.state == OPEN:
            self.state = CANCELLED
