"""Machines' output on the driver's stderr, without ever blocking a machine.

Each machine's lines wait in a buffer bounded per machine, and one thread
writes them to the driver's stderr. When nobody reads that stderr (a pipe no
one drains) the buffer fills and further lines are dropped and counted; once
stderr takes lines again, a line says how many were dropped. The original
drops rather than blocks too: a machine blocked on its print would stop
answering its calls.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Optional

LIMIT = 1 << 20  # characters of one machine's output held for a slow stderr


class _Output:
    def __init__(self, limit: int = LIMIT):
        self.limit = limit
        self.lines: collections.deque = collections.deque()  # (source, line)
        self.size: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def put(self, source: str, line: str) -> None:
        with self.cond:
            size = self.size.get(source, 0)
            if size + len(line) > self.limit:
                self.dropped[source] = self.dropped.get(source, 0) + 1
                return
            self.lines.append((source, line))
            self.size[source] = size + len(line)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="bigmachine-output")
                self.thread.start()
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.lines:
                    if not self.cond.wait(1.0) and not self.lines:
                        self.thread = None  # idle: the next line starts another
                        return
                source, line = self.lines.popleft()
                left = self.size[source] - len(line)
                if left:
                    self.size[source] = left
                else:
                    del self.size[source]
                dropped = self.dropped.pop(source, 0)
            if dropped:
                _write(f"{source}: [{dropped} lines of output were dropped while the driver's "
                       "stderr was not being read]\n")
            _write(line)

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cond:
                if not self.lines:
                    return
            time.sleep(0.01)


def _write(line: str) -> None:
    """Write to the driver's stderr; never raise.

    The driver's sys.stderr may be replaced or closed while machines run (a
    test harness capturing it, a closed terminal). The line then goes to the
    original stderr, or is dropped.
    """
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.write(line)
            stream.flush()
            return
        except (OSError, ValueError, AttributeError):
            continue


_output = _Output()


def forward(source: str, line: str) -> None:
    """Copy one line of machine source's output to the driver's stderr; never block or raise."""
    _output.put(source, line)


def flush(timeout: float = 1.0) -> None:
    """Wait (up to timeout) until the output gathered so far is written."""
    _output.flush(timeout)
