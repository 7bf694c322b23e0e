"""Status records of a cluster: what ``b.status()`` returns, as data and as a table."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Optional, Union


@dataclasses.dataclass
class CallStats:
    """One method's calls: how many, how many failed, how many run now, latency (s)."""

    count: int = 0
    errors: int = 0
    in_flight: int = 0
    p50: Optional[float] = None
    p99: Optional[float] = None


@dataclasses.dataclass
class MachineStatus:
    """One machine as its driver sees it.

    calls are counted on the machine (where the work runs); caller_calls by
    this process, through its handle (they include the transport). Figures
    the machine did not send (it is stopped or did not answer) are None.
    """

    name: str
    addr: str
    state: str
    uptime: Optional[float] = None
    cpus: Optional[int] = None
    rss: Optional[int] = None
    mem_total: Optional[int] = None
    mem_used: Optional[int] = None
    load1: Optional[float] = None
    healthy: bool = False
    err: Optional[str] = None
    keepalive_rtt: list = dataclasses.field(default_factory=list)
    calls: dict = dataclasses.field(default_factory=dict)
    caller_calls: dict = dataclasses.field(default_factory=dict)
    pid: Optional[int] = None
    hostname: Optional[str] = None
    host: dict = dataclasses.field(default_factory=dict)  # the system's facts (EC2: instance)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MachineStatus":
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in fields}
        for key in ("calls", "caller_calls"):
            kept[key] = {name: CallStats(**stats) for name, stats in kept.get(key, {}).items()}
        return cls(**kept)


class Status(Sequence):
    """The machines of a session at one moment: a sequence of MachineStatus.

    ``str()`` is a table (a row per machine, then a row per method it served);
    ``to_dict()`` is plain JSON-able data, and ``Status.from_dict`` reads it back.
    """

    def __init__(self, machines: list[MachineStatus], taken: Optional[float] = None):
        self.machines = machines
        self.taken = time.time() if taken is None else taken

    def __getitem__(self, index: Any) -> Any:
        return self.machines[index]

    def __len__(self) -> int:
        return len(self.machines)

    def __repr__(self) -> str:
        return f"<Status of {len(self.machines)} machines>"

    def to_dict(self) -> dict:
        return {"taken": self.taken, "machines": [m.to_dict() for m in self.machines]}

    @classmethod
    def from_dict(cls, data: dict) -> "Status":
        return cls([MachineStatus.from_dict(m) for m in data["machines"]], data.get("taken"))

    def __str__(self) -> str:
        return render(self)


def render(status: Status) -> str:
    """The table of a Status."""
    head = ("machine", "state", "addr", "up", "cpus", "rss", "mem used/limit", "load",
            "health", "keepalive")
    rows = [head]
    for m in status:
        rows.append((m.name, m.state, m.addr, duration(m.uptime), dash(m.cpus), size(m.rss),
                     f"{size(m.mem_used)}/{size(m.mem_total)}", dash(m.load1, "{:.2f}"),
                     "ok" if m.healthy else "UNHEALTHY",
                     latency(m.keepalive_rtt[-1] if m.keepalive_rtt else None)))
    lines = _columns(rows)
    calls = [(m.name, method, m.calls.get(method), m.caller_calls.get(method))
             for m in status for method in sorted(set(m.calls) | set(m.caller_calls))]
    if calls:
        rows = [("machine", "method", "calls", "errors", "in flight", "p50", "p99",
                 "caller p50", "caller p99")]
        for name, method, served, caller in calls:
            s = served or CallStats()
            c = caller or CallStats()
            rows.append((name, method, str(s.count), str(s.errors), str(s.in_flight),
                         latency(s.p50), latency(s.p99), latency(c.p50), latency(c.p99)))
        lines += [""] + _columns(rows)
    hosts = [f"{m.name}: " + ", ".join(f"{k} {v}" for k, v in m.host.items())
             for m in status if m.host]
    if hosts:
        lines += [""] + hosts
    errors = [f"{m.name}: {m.err}" for m in status if m.err]
    if errors:
        lines += [""] + errors
    return "\n".join(lines)


def _columns(rows: list) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def dash(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def size(n: Optional[Union[int, float]]) -> str:
    """Bytes, readably: 512 B, 3.2 MiB, 23.5 GiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def latency(seconds: Optional[float]) -> str:
    """Seconds, readably: 85us, 1.2ms, 3.40s."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def duration(seconds: Optional[float]) -> str:
    """Seconds, readably: 42s, 17m, 5h, 3d."""
    if seconds is None:
        return "-"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"
