"""A machine's memory health: checked every second, warned about once.

A machine whose memory use passes 90% of its limit (its cgroup's when set,
else the host's) is unhealthy: ``b.status()`` says so, and the machine logs
one warning (which reaches the driver's logging) until it is healthy again.
Memory is the process's, so one thread checks it for every machine a process
holds (InProcess machines share one), while any of them is open.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Optional

from . import _resources
from ._profile import waiting

log = logging.getLogger("bigmachine.health")

PERIOD = 1.0  # seconds between checks


class MemoryHealth:
    """The latest memory figures of this process, and whether we warned about them."""

    def __init__(self) -> None:
        self.warned = False

    def check(self) -> dict:
        """Read the figures now (see _resources.memory); warn once on turning unhealthy."""
        figures = _resources.memory()
        if not figures["healthy"] and not self.warned:
            self.warned = True
            log.warning("memory use %.0f MiB is over %d%% of the limit of %.0f MiB%s",
                        figures["mem_used"] / 2**20, _resources.UNHEALTHY_FRACTION * 100,
                        figures["mem_total"] / 2**20,
                        f" (cgroup {figures['memory_cgroup']})" if figures["memory_cgroup"] else "")
        elif figures["healthy"] and self.warned:
            self.warned = False
            log.info("memory use is back under %d%% of the limit", _resources.UNHEALTHY_FRACTION * 100)
        return figures



_health = MemoryHealth()
_nodes: "weakref.WeakSet[Any]" = weakref.WeakSet()  # the nodes whose machines are watched
_lock = threading.Lock()
_thread: Optional[threading.Thread] = None


def watch(node: Any) -> MemoryHealth:
    """Check this process's memory every PERIOD seconds while node (or another
    node of a machine here) is open; return the process's MemoryHealth."""
    global _thread
    with _lock:
        _nodes.add(node)
        if _thread is None:
            _thread = threading.Thread(target=_run, daemon=True, name="bigmachine-health")
            _thread.start()
    return _health


def _run() -> None:
    global _thread
    while True:
        with waiting():  # time.sleep leaves the profiler no frame to know the wait by
            time.sleep(PERIOD)
        with _lock:
            if all(node.closed for node in _nodes):
                _thread = None
                return
        _health.check()
