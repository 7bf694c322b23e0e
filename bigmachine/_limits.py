"""Process limits a cluster member sets for itself.

Descriptors: a member raises its soft RLIMIT_NOFILE to the hard limit, so that
peers (and strangers holding connections open) cannot exhaust a default of
1,024. Core dumps: a machine holds the cluster's secret and its TLS key in
memory, so it never writes a core file.
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


def no_core_dumps() -> None:
    """Never write a core file (it would hold the cluster's secrets)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def open_files() -> int:
    """The soft open-file limit."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
