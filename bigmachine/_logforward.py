"""Machines' log records, shipped to the driver's logging.

A driver registers a machine's services with its log level
(``Supervisor.register``). The machine then adds a handler to its root logger
that queues records at the driver's level, and a task on its IO loop sends
them in batches to the driver's built-in ``Logs`` service over the owner's
connection, one batch at a time (the reply paces the next); when the owner
re-dials (``Supervisor.claim``) they go on over the new connection. On the
driver each record goes to the logger ``bigmachine.machine.NAME``, with the
machine's name in front of the message and as ``record.machine``, for the
handlers the driver configured.
The machine's own stderr handler stays, at its level: its lines still reach
the driver's stderr with the machine's prefix (``m0: WARNING name: message``),
which is all a driver that configured no logging shows. Machines in the
driver's own process (``InProcess``) log there already.

Records that cannot be sent (a driver that reads too slowly, or refuses
a batch) are dropped and counted, never waited for: logging must not block a
machine. A lost connection ends the sending until the owner re-dials.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Any

from . import _rpc
from ._service import service
from .errors import MachineLost

MAX_QUEUED = 10_000  # records a machine holds for a slow driver; more are dropped
MAX_BATCH = 256
SEND_TIMEOUT = 30.0
SERVICE = "Logs"     # the driver's built-in service that receives records


class _Shipper(logging.Handler):
    """Queues records for the sender, from any thread, never blocking."""

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


_process = secrets.token_hex(8)  # see this_process


def _rename() -> None:
    global _process
    _process = secrets.token_hex(8)


os.register_at_fork(after_in_child=_rename)  # a forked child is another process


def this_process() -> str:
    """A random name for this process: unlike its pid, it differs between hosts and
    containers (a driver and a remote machine may both run as pid 7)."""
    return _process


class Forwarder:
    """Ships this process's records at level or above to conn's peer, every record
    logged after it is made: it installs the handler in the calling thread (before
    the services' init runs) and the sender on the machine's IO loop."""

    def __init__(self, name: str, conn: Any, level: int, loop: asyncio.AbstractEventLoop):
        self.name, self.conn, self.level, self.loop = name, conn, level, loop
        self.queue: asyncio.Queue = asyncio.Queue()  # bound to the loop as the sender uses it
        self.shipper = _Shipper(loop, self.queue)
        self.shipper.setLevel(level)
        root = logging.getLogger()
        for handler in root.handlers:  # they keep printing what they printed before
            if handler.level == logging.NOTSET:
                handler.setLevel(root.getEffectiveLevel())
        root.addHandler(self.shipper)
        root.setLevel(min(level, root.getEffectiveLevel()))
        loop.call_soon_threadsafe(loop.create_task, self._send())

    def stop(self) -> None:
        """Ship no more (from any thread; records still queued are dropped)."""
        logging.getLogger().removeHandler(self.shipper)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:
            pass  # the loop is closed: the sender is gone with it

    async def _send(self) -> None:
        queue, shipper = self.queue, self.shipper
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < MAX_BATCH:
                    batch.append(queue.get_nowait())
                if None in batch:
                    return  # stopped
                records, lost = len(batch), shipper.dropped
                if lost:
                    batch.append(("bigmachine.logs", logging.WARNING,
                                  f"{lost} log records were dropped",
                                  batch[-1][3], "", __file__, 0, "forward", "logs"))
                    shipper.dropped = 0
                try:
                    # The reply (None) is not unpickled: shipping logs costs a machine no loads.
                    await _rpc.acall(self.conn, f"{SERVICE}.records", (self.name, batch), {},
                                     SEND_TIMEOUT, decode=False)
                except MachineLost:
                    return  # the connection is gone: a re-dialled owner gets a new sender
                except Exception:  # the driver's error, whatever its type, or TimeoutError
                    shipper.dropped += lost + records  # refused or too slow: this batch only
        finally:
            logging.getLogger().removeHandler(shipper)


def emit(machine: str, item: tuple) -> None:
    """On the driver: log one record of machine's, if the driver's level lets it through."""
    name, levelno, message, created, exc, pathname, lineno, func, thread = item
    logger = logging.getLogger(f"bigmachine.machine.{machine}")
    if not logger.isEnabledFor(levelno):
        return
    if not logger.hasHandlers():
        return  # no logging configured here: the machine's stderr line is already shown
    record = logger.makeRecord(logger.name, levelno, pathname, lineno, f"{machine}: {message}",
                               (), None, func, {"machine": machine, "remote_logger": name,
                                                "remote_thread": thread})
    record.created = created
    record.exc_text = exc or None
    logger.handle(record)


@service
class Logs:
    """The driver's built-in service: machines send their log records here."""

    def records(self, machine: str, batch: list) -> None:
        for item in batch:
            emit(machine, item)
