"""Progress bars on the driver's terminal (tqdm): machines starting, large transfers.

Shown only when the session's ``progress`` option is on and stderr is a
terminal; never in a pipe, a log file or a test harness's capture.
Transfers are watched by one thread that polls each connection's counters
ten times a second, so the transport itself pays nothing per frame beyond
adding up bytes.
"""
from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from tqdm import tqdm

MIN_MACHINES = 2          # starting fewer machines than this shows no bar
MIN_TRANSFER = 64 << 20   # bytes: smaller messages show no bar
POLL = 0.1                # seconds between looks at the connections


def on_terminal(option: bool) -> bool:
    """True if progress should show: the option is on and stderr is a terminal."""
    try:
        return option and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False  # stderr replaced or closed


class _NoBar:
    """What machines_bar gives when nothing shows: importing tqdm (13 ms, measured) is
    then not worth it on a start's path."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def machines_bar(n: int, show: bool) -> Union["tqdm", _NoBar]:
    """A bar for n machines starting (a context manager with update(k)); a no-op one
    unless shown."""
    if not show or n < MIN_MACHINES:
        return _NoBar()
    from tqdm import tqdm  # here: machines (an SSH host's venv) need not have it

    return tqdm(total=n, desc="starting machines", unit="machine", leave=False)


class TransferBars:
    """A thread showing a bar for each message of MIN_TRANSFER bytes or more in flight."""

    def __init__(self, node: Any):
        self.node = node
        self.bars: dict[tuple, tuple["tqdm", int]] = {}  # (conn, direction) -> (bar, counter base)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="bigmachine-progress")
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(POLL):
            conns = list(self.node.connections.values()) + list(self.node.accepted)
            for conn in conns:
                self._show(conn, "sending to", conn.queued_bytes, conn.bytes_sent)
                self._show(conn, "receiving from", conn.decoder.pending_bytes, conn.bytes_received)
            for key in [k for k in self.bars if k[0] not in conns]:
                self._close(key)

    def _show(self, conn: Any, direction: str, pending: int, counter: int) -> None:
        key = (conn, direction)
        entry: Optional[tuple] = self.bars.get(key)
        if entry is None:
            if pending >= MIN_TRANSFER:
                from tqdm import tqdm

                bar = tqdm(total=pending, desc=f"{direction} {conn.peer}", unit="B",
                           unit_scale=True, unit_divisor=1024, leave=False)
                self.bars[key] = (bar, counter)
            return
        bar, base = entry
        if pending == 0:
            bar.update(max(0, bar.total - bar.n))
            self._close(key)
            return
        bar.total = max(bar.total, counter - base + pending)
        bar.update(max(0, counter - base - bar.n))

    def _close(self, key: tuple) -> None:
        bar, _ = self.bars.pop(key)
        bar.close()

    def close(self) -> None:
        """Stop watching; idempotent."""
        self.stopped.set()
        self.thread.join(5)
        for key in list(self.bars):
            self._close(key)
