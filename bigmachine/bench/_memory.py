"""Memory figures of this process (Linux): current and peak RSS, and resetting the peak.

Used by the raw baseline server and by the Echo service, so it imports nothing of ours.
"""
from __future__ import annotations


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status("VmRSS")


def rss_peak() -> int:
    return _status("VmHWM")


def rss_reset() -> int:
    """Reset the peak-RSS mark (VmHWM) to the current RSS; return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss_now()
