"""The session's views inside its cluster: status, CPU and memory profiles.

``Observing`` is a part of ``B`` (its base class): it asks each machine's
Supervisor in parallel and merges the answers with what the driver itself
measured (its calls through each handle, keepalive round trips).
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable, Optional

from . import _profile, _resources
from ._machine import Machine, State
from ._profile import MemoryProfile, Profile
from ._status import MachineStatus, Status
from .errors import Error

log = logging.getLogger("bigmachine")

SLACK = 30.0  # seconds a profile's reply may take beyond its sampling


class Observing:
    """status(), profile() and memory_profile() of a session (mixed into B)."""

    machines: Callable[[], list[Machine]]
    _status_machines: Callable[[], list[Machine]]  # the session's: what status() lists

    def __init__(self) -> None:
        # addr -> (memory cgroup, its OOM kills) as the machine last reported them,
        # to tell an out-of-memory death from another SIGKILL.
        self._memory_seen: dict[str, tuple[Optional[str], int]] = {}

    def status(self, timeout: float = 10.0) -> Status:
        """Every machine's state, resources, memory health, keepalives and calls.

        Running machines are asked in parallel (each within timeout seconds);
        one that does not answer has the reason in its record's err.
        """
        machines = sorted(self._status_machines(), key=_by_name)
        return Status(_each(machines, lambda m: self._machine_status(m, timeout)))

    def _machine_status(self, m: Machine, timeout: float) -> MachineStatus:
        record: dict = {"name": m.name, "addr": m.addr, "state": m.state.name,
                        "err": None if m.err is None else str(m.err),
                        "keepalive_rtt": m.keepalive_rtt, "caller_calls": m.counters.snapshot(),
                        "host": m.process.host_facts() if m.process is not None else {}}
        if m.state == State.RUNNING:
            try:
                figures = m.call("Supervisor.status", timeout=timeout)
            except (Error, TimeoutError) as exc:
                record["err"] = f"no status: {exc}"
            else:
                self._memory_seen[m.addr] = (figures["memory_cgroup"], figures["oom_kills"])
                record.update({k: v for k, v in figures.items() if k not in record})
        return MachineStatus.from_dict(record)

    def _exit_reason(self, m: Machine) -> str:
        """How m's process ended, naming the OOM killer when there is evidence of it."""
        how = m.process.describe_exit()
        cgroup, kills = self._memory_seen.get(m.addr, (None, 0))
        oom = _resources.oom_evidence(m.process.local_pid(), cgroup, kills)
        return f"{how}: out of memory; {oom}" if oom else how

    def profile(self, seconds: float = 10.0, machines: Optional[list[Machine]] = None,
                driver: bool = False, hz: float = _profile.HZ) -> Profile:
        """Sample every thread of the machines (default: all running) for seconds.

        Returns one merged Profile whose stacks start with the machine's name
        ("driver" for this process, with driver=True). Machines that fail are
        named in the Profile's errors.
        """
        targets = self._targets(machines)
        parts: dict[str, Any] = {}
        errors: dict[str, str] = {}

        def one(m: Optional[Machine]) -> None:
            try:
                if m is None:
                    parts["driver"] = _profile.sample(seconds, hz)
                else:
                    parts[m.name] = m.call("Supervisor.profile", seconds, hz, timeout=seconds + SLACK)
            except (Error, TimeoutError) as exc:
                errors["driver" if m is None else m.name] = str(exc)

        _each(targets + ([None] if driver else []), one)
        return Profile.merge(parts, seconds, hz, errors)

    def memory_profile(self, seconds: float = 5.0, top: int = 20,
                       machines: Optional[list[Machine]] = None) -> MemoryProfile:
        """Trace allocations on the machines for seconds (tracemalloc, only meanwhile).

        Returns each machine's top allocation sites of what is still allocated.
        """
        sites: dict[str, list] = {}
        errors: dict[str, str] = {}

        def one(m: Machine) -> None:
            try:
                sites[m.name] = m.call("Supervisor.memory_profile", seconds, top,
                                       timeout=seconds + SLACK)
            except (Error, TimeoutError) as exc:
                errors[m.name] = str(exc)

        _each(self._targets(machines), one)
        return MemoryProfile(dict(sorted(sites.items(), key=lambda kv: _by_name_str(kv[0]))), errors)

    def _targets(self, machines: Optional[list[Machine]]) -> list[Machine]:
        chosen = self.machines() if machines is None else list(machines)
        return sorted((m for m in chosen if m.state == State.RUNNING), key=_by_name)


def _by_name_str(name: str) -> tuple:
    return (len(name), name)  # m2 before m10


def _by_name(m: Machine) -> tuple:
    return _by_name_str(m.name)


def _each(items: list, fn: Callable[[Any], Any]) -> list:
    """fn of every item, in parallel threads; the results in order."""
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(items), 16),
                                               thread_name_prefix="bigmachine-observe") as pool:
        return list(pool.map(fn, items))
