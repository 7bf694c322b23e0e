"""Services for the observability tests, importable by machines as tests.obs_services."""
from __future__ import annotations

import logging
import time

import bigmachine as bm


def only_on_one_machine(seconds: float) -> int:
    """Burn CPU in a function with a name no other code has."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(1000))
    return n


@bm.service
class Work:
    """Calls to count, CPU to profile, memory to hog, records to log."""

    def init(self, machine) -> None:
        self.held: list = []

    def echo(self, x):
        return x

    def fail(self, msg: str):
        raise ValueError(msg)

    def slow(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def burn(self, seconds: float) -> int:
        return only_on_one_machine(seconds)

    def hold(self, mib: int) -> int:
        """Allocate and touch mib MiB more, keep it; return the MiB held."""
        self.held.append(bytearray(mib << 20))
        return sum(len(b) for b in self.held) >> 20

    def warn(self, message: str) -> None:
        logging.getLogger("tests.obs").warning("%s from the machine", message)

    def debug(self, message: str) -> None:
        logging.getLogger("tests.obs").debug(message)

    def sink(self, array) -> int:
        return array.nbytes


@bm.service
class Chatty:
    """Logs a warning as its machine starts, from its init."""

    def init(self, machine) -> None:
        logging.getLogger("tests.obs").warning("%s starting", machine.name)
