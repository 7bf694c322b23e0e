"""Who may hold a connection open before proving membership, and for how long.

Unauthenticated connections are capped in all and per source address, from
the open-file limit. When a cap is reached the oldest unauthenticated
connection is dropped to make room, so a member that dials during a flood
still gets in; strangers cannot starve it by holding descriptors. Refusals
are logged at a bounded rate, not once each.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable, Optional

PER_SOURCE_SHARE = 4   # one source address may hold a quarter of the total cap
LOG_EVERY = 10.0       # seconds between refusal summaries once they come fast
LOG_BURST = 20         # refusals logged one by one in each period


def caps(open_files: int) -> tuple[int, int]:
    """(total, per source) unauthenticated connections allowed under open_files descriptors."""
    total = max(16, min(open_files // 4, 65536))
    return total, max(4, total // PER_SOURCE_SHARE)


class Admission:
    """The unauthenticated connections of one listener, oldest first."""

    def __init__(self, open_files: int):
        self.total, self.per_source = caps(open_files)
        self._pending: "OrderedDict[int, tuple[str, Callable[[], None]]]" = OrderedDict()
        self._by_source: dict[str, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, source: str, drop: Callable[[], None]) -> int:
        """Admit a new connection from source; drop the oldest ones over a cap. Returns its key."""
        if self._by_source.get(source, 0) >= self.per_source:
            self._drop_oldest(source)
        if len(self._pending) >= self.total:
            self._drop_oldest(None)
        key = self._next
        self._next += 1
        self._pending[key] = (source, drop)
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return key

    def done(self, key: int) -> None:
        """The connection authenticated, failed or was dropped."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        source = entry[0]
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]

    def _drop_oldest(self, source: Optional[str]) -> None:
        for key, (src, drop) in self._pending.items():
            if source is None or src == source:
                self.done(key)
                drop()
                return


class RefusalLog:
    """Log refused connections: at most LOG_BURST one by one per LOG_EVERY seconds,
    then how many more were refused in that period, once it ends."""

    def __init__(self, log: logging.Logger, name: str, loop: asyncio.AbstractEventLoop):
        self.log = log
        self.name = name
        self.loop = loop
        self.period_start = -LOG_EVERY
        self.logged = 0
        self.suppressed = 0

    def refused(self, peer: str, reason: str) -> None:
        """Called on the loop for each refused connection."""
        now = time.monotonic()
        if now - self.period_start >= LOG_EVERY:
            self.period_start, self.logged = now, 0
        if self.logged < LOG_BURST:
            self.logged += 1
            self.log.warning("%s: refused connection from %s: %s", self.name, peer, reason)
            return
        if not self.suppressed:
            self.loop.call_later(self.period_start + LOG_EVERY - now, self._summary)
        self.suppressed += 1

    def _summary(self) -> None:
        count, self.suppressed = self.suppressed, 0
        self.log.warning("%s: refused %d more connections in the last %g s (not logged one by one)",
                         self.name, count, LOG_EVERY)
