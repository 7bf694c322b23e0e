"""Services for tests/test_links.py. Machines (local and SSH) import this module, so it
imports nothing beyond bigmachine and the standard library."""
from __future__ import annotations

import resource
import threading

import bigmachine as bm


@bm.service
class Ledger:
    """Records every argument it receives, so a test can tell what reached a service."""

    def init(self, machine) -> None:
        self.got: list = []
        self.lock = threading.Lock()

    def record(self, value):
        with self.lock:
            self.got.append(value)
        return value

    def seen(self) -> list:
        with self.lock:
            return list(self.got)

    def limits(self) -> dict:
        return {"core": resource.getrlimit(resource.RLIMIT_CORE),
                "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}


@bm.service
class Peer:
    """Calls other members from inside a machine."""

    def handle_name(self, machine) -> str:
        return machine.name

    def call(self, machine, method, *args, **kwargs):
        return machine.call(method, *args, timeout=10, **kwargs)

    def dial(self, addr, name, method, *args, **kwargs):
        return bm.current().dial(addr, name).call(method, *args, timeout=10, **kwargs)
