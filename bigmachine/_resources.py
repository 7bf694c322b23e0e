"""What this host gives this process: usable CPUs, memory limit and use, OOM kills.

Linux first: the limits come from the process's cgroup when one is set (v2
``cpu.max``/``memory.max``, v1 ``cpu.cfs_quota_us``/``memory.limit_in_bytes``),
else from the host. Every reader returns a plain value and never raises on a
missing or unreadable file: a host without cgroups simply has no cgroup limit.
"""
from __future__ import annotations

import os
from typing import Optional

CGROUP_ROOT = "/sys/fs/cgroup"
UNHEALTHY_FRACTION = 0.9  # memory use above this share of the limit is unhealthy
# cgroup v1 reports "no limit" as a huge number near 2**63.
_NO_LIMIT = 1 << 60


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _fields(path: str) -> dict[str, int]:
    """A "key value" per line file (memory.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def cgroup_dir(controller: str, pid: str = "self") -> Optional[str]:
    """The directory of pid's cgroup for controller ("memory", "cpu"), or None.

    v1 lines are ``N:controller,...:/path``; the v2 line is ``0::/path``. A v1
    hierarchy of the controller wins over v2 (hybrid hosts). When the path is
    not visible under the mount (a cgroup namespace), the mount's root is it.
    """
    text = _read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    unified = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            for candidate in (f"{CGROUP_ROOT}/{controller}{path}", f"{CGROUP_ROOT}/{controller}"):
                if os.path.isdir(candidate):
                    return candidate.rstrip("/")
        elif controllers == "":
            unified = path
    if unified is not None:
        for base in (CGROUP_ROOT, f"{CGROUP_ROOT}/unified"):
            candidate = f"{base}{unified}".rstrip("/")
            if os.path.exists(f"{candidate}/cgroup.controllers"):
                return candidate
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by the cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    d = cgroup_dir("cpu")
    if d is not None:
        quota = period = None
        v2 = _read(f"{d}/cpu.max")
        if v2 is not None:
            q, _, p = v2.partition(" ")
            if q != "max" and q.isdigit() and p.isdigit():
                quota, period = int(q), int(p)
        else:
            q, p = _read(f"{d}/cpu.cfs_quota_us"), _read(f"{d}/cpu.cfs_period_us")
            if q and p and q.lstrip("-").isdigit() and p.isdigit() and int(q) > 0:
                quota, period = int(q), int(p)
        if quota and period:
            cpus = min(cpus, max(1, -(-quota // period)))
    return max(1, cpus)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of the host's memory (/proc/meminfo)."""
    info: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0]) * 1024
    total = info.get("MemTotal", 0)
    return total, info.get("MemAvailable", total)


def cgroup_memory(d: Optional[str]) -> Optional[tuple[int, int]]:
    """(limit, working set) bytes of the memory cgroup d, or None when it sets no limit.

    The working set is usage less inactive file cache (what the kernel cannot
    simply drop), as container runtimes count it.
    """
    if d is None:
        return None
    v2 = _read(f"{d}/memory.max")
    if v2 is not None:
        if not v2.isdigit():
            return None  # "max"
        limit, usage = int(v2), int(_read(f"{d}/memory.current") or 0)
        inactive = _fields(f"{d}/memory.stat").get("inactive_file", 0)
    else:
        raw = _read(f"{d}/memory.limit_in_bytes")
        if raw is None or not raw.isdigit() or int(raw) >= _NO_LIMIT:
            return None
        limit, usage = int(raw), int(_read(f"{d}/memory.usage_in_bytes") or 0)
        inactive = _fields(f"{d}/memory.stat").get("total_inactive_file", 0)
    return limit, max(0, usage - inactive)


def memory() -> dict:
    """This process's memory: rss, mem_total (the limit), mem_used, healthy, cgroup."""
    d = cgroup_dir("memory")
    limited = cgroup_memory(d)
    total, available = host_memory()
    if limited is not None and limited[0] < total:
        limit, used = limited
    else:
        limit, used = total, total - available
    return {"rss": rss(), "mem_total": limit, "mem_used": used,
            "healthy": not limit or used <= UNHEALTHY_FRACTION * limit,
            "memory_cgroup": d if limited is not None else None,
            "oom_kills": oom_kills(d) if limited is not None else 0}


def rss() -> int:
    """Resident bytes of this process now (/proc/self/statm)."""
    text = _read("/proc/self/statm")
    if not text:
        return 0
    return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def oom_kills(d: Optional[str]) -> int:
    """How many processes the OOM killer ended in memory cgroup d (v2 memory.events,
    v1 memory.oom_control)."""
    if d is None:
        return 0
    events = _fields(f"{d}/memory.events")
    if "oom_kill" in events:
        return events["oom_kill"]
    return _fields(f"{d}/memory.oom_control").get("oom_kill", 0)


def kernel_log_oom(pid: int) -> Optional[str]:
    """The kernel log's line saying the OOM killer killed pid, when the log is readable."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    needle = f"Killed process {pid} ("
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records were overwritten while we read; go on
                continue
            if needle in record:
                found = record.split(";", 1)[-1].strip()
    finally:
        os.close(fd)
    return found


def oom_evidence(pid: Optional[int], cgroup: Optional[str], kills_before: int) -> Optional[str]:
    """Why we believe the OOM killer ended a machine, or None.

    pid: the machine's process on this host (None when it ran elsewhere);
    cgroup and kills_before: its memory cgroup and that cgroup's OOM-kill count
    as the machine last reported them.
    """
    if pid is not None:
        line = kernel_log_oom(pid)
        if line is not None:
            return f"the kernel's OOM killer ended it: {line}"
    if cgroup is not None and oom_kills(cgroup) > kills_before:
        limit = cgroup_memory(cgroup)
        what = f" of {limit[0] / 2**20:.0f} MiB" if limit else ""
        return f"the kernel's OOM killer ended a process in its memory cgroup {cgroup}{what}"
    return None
