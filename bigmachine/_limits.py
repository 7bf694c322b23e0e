"""Process limits a cluster member sets for itself.

Descriptors: a member raises its soft RLIMIT_NOFILE to the hard limit, so that
peers (and strangers holding connections open) cannot exhaust a default of
1,024. Core dumps: a member holds the cluster's secret and its TLS key in
memory, so it writes no core file: a machine never, the driver (the user's
own program) not unless its user raises the soft limit again.
"""
from __future__ import annotations

import resource


def raise_open_files() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. above the kernel's nr_open: keep what we have
    return soft


def no_core_dumps(lock: bool = True) -> None:
    """Write no core file (it would hold the cluster's secrets). lock: the hard
    limit too, so that nothing can raise the soft one again (a machine's own
    process); else the soft limit only (the driver: its user may accept the risk)."""
    hard = 0 if lock else resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


def open_files() -> int:
    """The soft open-file limit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
