"""A thread pool for sync service methods, built for hand-off latency.

An idle worker is handed its task directly and woken with one lock release:
no Future, no shared queue, no semaphore. The most recently idle worker is
woken first (it is the warmest, and likely on the calling CPU). When every
worker is busy and the pool is at its size, tasks wait in a backlog that
finishing workers drain. Compared with concurrent.futures.ThreadPoolExecutor
this halves a sync call's cost on the machine (bench/ping.py).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Optional

log = logging.getLogger("bigmachine.pool")


class Pool:
    """Runs fn(*args) on worker threads (daemons), at most max_workers at once."""

    def __init__(self, max_workers: int, name: str, initializer: Optional[Callable[[], None]] = None):
        self.max_workers = max_workers
        self.name = name
        self.initializer = initializer
        self._lock = threading.Lock()
        self._idle: list = []        # [wakeup lock, task] of each idle worker, LIFO
        self._backlog: deque = deque()
        self._workers = 0
        self._closed = False

    def submit(self, fn: Callable, *args: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if self._idle:
                slot = self._idle.pop()
                slot[1] = (fn, args)
                slot[0].release()
                return
            if self._workers >= self.max_workers:
                self._backlog.append((fn, args))
                return
            self._workers += 1
            number = self._workers
        threading.Thread(target=self._work, args=((fn, args),), daemon=True,
                         name=f"{self.name}-{number}").start()

    def _work(self, task: Any) -> None:
        if self.initializer is not None:
            self.initializer()
        slot = [threading.Lock(), None]
        slot[0].acquire()
        while task is not None:
            fn, args = task
            try:
                fn(*args)
            except BaseException:
                log.exception("%s: a task failed", self.name)
            task = fn = args = None  # hold nothing while idle
            with self._lock:
                if self._backlog:
                    task = self._backlog.popleft()
                    continue
                if self._closed:
                    break
                self._idle.append(slot)
            slot[0].acquire()
            task, slot[1] = slot[1], None
        with self._lock:
            self._workers -= 1

    def shutdown(self) -> None:
        """Stop idle workers and drop the backlog; busy ones end after their task."""
        with self._lock:
            self._closed = True
            self._backlog.clear()
            idle, self._idle = self._idle, []
        for slot in idle:
            slot[1] = None
            slot[0].release()
