"""One thread per process that notices bytes arriving on connections nobody is reading.

A connection's reading role is sometimes left unattended: while the reading
thread runs a short method itself, or while it is parked for a blocking
caller to take (see ``_reader``). For that time the reader arms its socket
here; the standby thread waits in ``epoll`` for any armed socket to become
readable and then calls its reader's ``data_waiting()``, which puts a thread
back on reading. Arming and disarming are one ``epoll_ctl`` each, so a
connection that is left unattended only briefly costs no thread wake-up at
all, and one left for long costs none either unless something arrives.

It also keeps time for readers: ``wake_at(reader, deadline)`` makes it
call ``reader.timed_out(now)`` at the deadline, for a reader running a
batch of deferred work (which is not cut short by bytes arriving) and for
one whose role the IO loop holds (which a coroutine blocking the loop must
not keep from reading); under a steady load that is one wake-up per
deadline, not per batch or call. The thread ends when the last connection
it watched or kept time for has closed.
"""
from __future__ import annotations

import math
import os
import select
import threading
import time
from typing import Any, Optional

from ._profile import waiting

_ARMED = select.EPOLLIN | select.EPOLLONESHOT
_DISARMED = select.EPOLLONESHOT  # reports nothing more (one hang-up at most) until armed


class Standby:
    """Calls reader.data_waiting() when an armed socket becomes readable."""

    def __init__(self) -> None:
        self._epoll: Optional[select.epoll] = None
        self._stop_fd = -1                   # written to when the thread should look at _readers
        self._readers: dict[int, Any] = {}   # fd -> reader
        self._timed: dict[Any, float] = {}   # reader -> deadline to look at it
        self._wake_at = math.inf             # when the thread will next look at _timed
        self._lock = threading.Lock()

    def _start(self) -> select.epoll:
        """With the lock held: the epoll set, and its thread, made if need be."""
        if self._epoll is None:
            self._epoll = epoll = select.epoll()
            stop_r, self._stop_fd = os.pipe()
            epoll.register(stop_r, select.EPOLLIN)
            threading.Thread(target=self._run, args=(epoll, stop_r), daemon=True,
                             name="bigmachine-standby").start()
        return self._epoll

    def arm(self, fd: int, reader: Any) -> None:
        """Watch fd for reader until disarm (a single report)."""
        epoll = self._epoll
        if epoll is not None and self._readers.get(fd) is reader:  # the usual case: inline
            try:
                epoll.modify(fd, _ARMED)
            except (OSError, ValueError):
                pass  # the socket (or, with the last one, the epoll set) closed meanwhile
        else:
            with self._lock:  # the first time: register (the thread cannot end meanwhile)
                epoll = self._start()
                self._readers[fd] = reader
                try:
                    epoll.register(fd, _ARMED)
                except FileExistsError:  # a closed socket's number, reused
                    epoll.modify(fd, _ARMED)
                except OSError:
                    pass  # the socket closed meanwhile: its reader learns of it by reading

    def disarm(self, fd: int, reader: Any) -> None:
        epoll = self._epoll
        if epoll is not None and self._readers.get(fd) is reader:
            try:
                epoll.modify(fd, _DISARMED)
            except (OSError, ValueError):
                pass

    def wake_at(self, reader: Any, deadline: float) -> None:
        """Call reader.timed_out(now) at deadline (time.monotonic()), or soon after."""
        with self._lock:
            self._start()
            self._timed[reader] = min(deadline, self._timed.get(reader, math.inf))
            if deadline < self._wake_at:  # the thread sleeps longer: wake it to look again
                self._wake_at = deadline
                os.write(self._stop_fd, b"t")

    def forget(self, fd: int, reader: Any) -> None:
        """reader's connection closed: stop watching its socket."""
        with self._lock:
            self._timed.pop(reader, None)
            if self._readers.get(fd) is reader:
                del self._readers[fd]
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass  # the socket is closed already, which unregistered it
            if self._epoll is not None and not self._readers and not self._timed:
                os.write(self._stop_fd, b"x")  # nothing left to watch: the thread ends

    def _run(self, epoll: select.epoll, stop_r: int) -> None:
        while True:
            with self._lock:
                if not self._readers and not self._timed:  # nothing left to watch or time
                    self._epoll = None
                    os.close(self._stop_fd)
                    os.close(stop_r)
                    epoll.close()
                    return
                self._wake_at = min(self._timed.values(), default=math.inf)
                timeout = -1 if self._wake_at == math.inf else max(0.0, self._wake_at - time.monotonic())
            with waiting():
                ready = epoll.poll(timeout)
            for fd, _ in ready:
                if fd == stop_r:
                    os.read(stop_r, 64)
                    continue
                reader = self._readers.get(fd)
                if reader is not None:
                    reader.data_waiting()
            self._look_at_timed()

    def _look_at_timed(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [reader for reader, deadline in self._timed.items() if deadline <= now]
            for reader in due:
                del self._timed[reader]
        for reader in due:
            deadline = reader.timed_out(now)  # a later one, if another batch runs now
            if deadline:
                with self._lock:
                    self._timed[reader] = min(deadline, self._timed.get(reader, math.inf))


STANDBY = Standby()
