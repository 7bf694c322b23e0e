"""Machines' log records, shipped to the driver's logging.

On a machine, ``Supervisor.logs`` (an async generator) puts a handler on the
root logger at the driver's level and streams the records it catches in
batches, in place of the machine's own stderr handler while the stream lasts.
On the driver, a ``LogFollower`` thread follows that stream of every machine
and hands each record to the logger ``bigmachine.machine.NAME``, with the
machine's name in front of the message and as ``record.machine``.
Machines in the driver's own process (``InProcess``) log there already.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, AsyncIterator, Optional

from .errors import Error

MAX_QUEUED = 10_000  # records a machine holds for a slow driver; more are dropped
MAX_BATCH = 256


class _Shipper(logging.Handler):
    """Queues records for the stream, from any thread, never blocking."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        super().__init__()
        self.loop = loop
        self.queue = queue
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
            item = (record.name, record.levelno, record.getMessage(), record.created, exc,
                    record.pathname, record.lineno, record.funcName, record.threadName)
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:
            pass  # the loop is closed: the machine is stopping
        except Exception:
            self.handleError(record)

    def _put(self, item: tuple) -> None:
        if self.queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
        else:
            self.queue.put_nowait(item)


async def records(level: int) -> AsyncIterator[list]:
    """On a machine: batches of this process's log records at level or above."""
    queue: asyncio.Queue = asyncio.Queue()
    shipper = _Shipper(asyncio.get_running_loop(), queue)
    root = logging.getLogger()
    replaced, old_level = list(root.handlers), root.level
    for handler in replaced:
        root.removeHandler(handler)
    root.addHandler(shipper)
    root.setLevel(level)
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < MAX_BATCH:
                batch.append(queue.get_nowait())
            if shipper.dropped:
                batch.append(("bigmachine.logs", logging.WARNING,
                              f"{shipper.dropped} log records dropped: the driver read too slowly",
                              batch[-1][3], "", __file__, 0, "records", "logs"))
                shipper.dropped = 0
            yield batch
    finally:
        root.removeHandler(shipper)
        for handler in replaced:
            root.addHandler(handler)
        root.setLevel(old_level)


def emit(machine: str, item: tuple) -> None:
    """On the driver: log one record of machine's, if the driver's level lets it through."""
    name, levelno, message, created, exc, pathname, lineno, func, thread = item
    logger = logging.getLogger(f"bigmachine.machine.{machine}")
    if not logger.isEnabledFor(levelno):
        return
    record = logger.makeRecord(logger.name, levelno, pathname, lineno, f"{machine}: {message}",
                               (), None, func, {"machine": machine, "remote_logger": name,
                                                "remote_thread": thread})
    record.created = created
    record.exc_text = exc or None
    logger.handle(record)


class LogFollower:
    """On the driver: one thread that follows every machine's log stream."""

    def __init__(self, name: str):
        self.name = name
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def follow(self, machine: Any) -> None:
        """Start following machine's records, at the driver's current root level."""
        level = logging.getLogger().getEffectiveLevel()
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                                name=f"bigmachine-logs-{self.name}")
                self._thread.start()
            self._loop.call_soon_threadsafe(self._loop.create_task, self._follow(machine, level))

    async def _follow(self, machine: Any, level: int) -> None:
        try:
            async for batch in machine.astream("Supervisor.logs", level, os.getpid()):
                for item in batch:
                    emit(machine.name, item)
        except (Error, asyncio.CancelledError):
            return  # the machine stopped, or we are closing: its records end here

    def close(self) -> None:
        """Stop following; idempotent."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return

        async def stop() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()  # each cancels its stream on its machine
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        except TimeoutError:
            pass  # stop anyway: the machines' streams end with their connections
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not loop.is_running():
            loop.close()
