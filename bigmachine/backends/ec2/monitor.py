"""Watching instances whose machines went quiet: one batched, rate-limited
describe_instances for all of them, not one per machine.

A machine's process asks (`check`) when the driver lost touch with it (a
broken link, failed keepalives); the monitor's thread gathers every id asked
since its last look and describes them together, at most once per INTERVAL,
so that an instance terminated under its machines (spot reclaim, the console)
is known within a few seconds, with EC2's reason.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .instances import Instance, describe

log = logging.getLogger("bigmachine.ec2")
INTERVAL = 1.0  # seconds between two looks


class Monitor:
    """Looks up instances on request; calls on_state(instance) with what it found."""

    def __init__(self, ec2: Callable[[], Any], on_state: Callable[[Instance], None]):
        self._ec2 = ec2
        self._on_state = on_state
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.looks = 0  # describe_instances requests made

    def check(self, instance_id: str) -> None:
        """Look at this instance soon (with any others asked meanwhile)."""
        with self._cond:
            if self._closed:
                return
            self._pending.add(instance_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="bigmachine-ec2-monitor")
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
            time.sleep(max(0.0, last + INTERVAL - time.monotonic()))
            with self._cond:
                ids, self._pending = sorted(self._pending), set()
            last = time.monotonic()
            self.looks += 1
            try:
                found = describe(self._ec2(), ids)
            except Exception as exc:  # no answer now: the driver's own timers decide
                log.warning("cannot look up instances %s: %s", ", ".join(ids), exc)
                continue
            for instance_id in ids:
                self._on_state(found.get(instance_id) or Instance(
                    instance_id, state="terminated", reason="EC2 no longer knows it"))
