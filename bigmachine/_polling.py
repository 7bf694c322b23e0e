"""The node's event loop, busy-polling as its connections' readers do.

An async method's requests are read and run on the node's loop (see
_reader), which sleeps in ``epoll_wait`` between them; on a VM the wake-up
of that thread costs more than a small call. Its selector polls first, for
up to the node's ``busy_poll`` window, while its last wait was that short
(``_sockio.Spin``).
"""
from __future__ import annotations

import asyncio
import selectors
import time
from typing import Optional

from ._sockio import Spin


class PollingSelector(selectors.EpollSelector):
    """An epoll selector whose blocking selects busy-poll first while waits are short."""

    def __init__(self, window: float):
        super().__init__()
        self._spin = Spin(window)

    def select(self, timeout: Optional[float] = None) -> list:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        start = time.monotonic()
        if self._spin.wait_ready(self.fileno(), -1.0 if timeout is None else timeout):
            return super().select(0)  # ready at once: no wait to learn from
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
        ready = super().select(timeout)
        self._spin.learn(time.monotonic() - start)
        return ready


def new_event_loop(busy_poll: float) -> asyncio.AbstractEventLoop:
    """A new event loop whose selects poll for up to busy_poll seconds (0: never)."""
    if not busy_poll:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(PollingSelector(busy_poll))
