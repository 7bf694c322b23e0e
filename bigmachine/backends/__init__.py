"""Systems: the ways machines are launched. One module per system.

A System launches machine processes and hands back a Process handle for
each; the driver's B does the rest (connecting, registering services,
keepalives) the same way for every system.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any, Optional

from .._auth import Credentials
from ..errors import Error


def forward_output(line: str) -> None:
    """Copy one line of a machine's output to the driver's stderr; never raise.

    The driver's sys.stderr may be replaced or closed while machines run (a
    test harness capturing it, a closed terminal). The line then goes to the
    original stderr, or is dropped: a machine's output must keep draining,
    or the machine blocks on its next print.
    """
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.write(line)
            stream.flush()
            return
        except (OSError, ValueError, AttributeError):
            continue


class Process(ABC):
    """A system's handle on one launched machine."""

    addr: str

    @abstractmethod
    def alive(self, wait: float = 0.0) -> bool:
        """True while the machine runs; waits up to `wait` seconds for it to end."""

    @abstractmethod
    def describe_exit(self) -> str:
        """How the machine ended, for error messages."""

    @abstractmethod
    def stop(self, timeout: float) -> None:
        """Wait up to timeout for the machine to end, then kill it; collect its output."""

    def local_pid(self) -> Optional[int]:
        """The machine's process id when it is a process of this host, else None."""
        return None


class System(ABC):
    """How machines are launched, and the timing of their keepalives.

    keepalive_period: seconds between the driver's keepalives.
    lost_after: seconds without any reply before the driver declares a
        machine lost (also the connection's TCP_USER_TIMEOUT).
    lease: seconds a machine lives on without keepalives before it stops itself.
    start_timeout: seconds b.start() waits for a machine to come up.
    tls: every connection of the cluster is TLS 1.3 with certificates of a
        per-cluster CA (inside it, the secret handshake still runs).
    socket_buffer: kernel socket buffer bytes of the cluster's connections
        (small on local links keeps pings prompt beside bulk transfers);
        0 leaves them to the kernel's autotuning, for long-distance links.
    status_addr: "host:port" where the driver serves its status page (None:
        no page); give a loopback host unless others must reach it.
    progress: show progress bars on a terminal (starting machines, large
        transfers); never when stderr is not a terminal.
    """

    name = "system"
    keepalive_period = 1.0
    lost_after = 5.0
    lease = 5.0
    start_timeout = 60.0
    tls = False
    socket_buffer = 1 << 20
    status_addr: Optional[str] = None
    progress = True

    def configure(self, **options: Any) -> None:
        """Set options: tls, socket_buffer, status_addr, progress, and timing
        (keepalive_period, lost_after, lease, start_timeout)."""
        for key, value in options.items():
            if key == "status_addr":
                if value is not None and not isinstance(value, str):
                    raise Error(f"option status_addr must be 'host:port' or None, not {value!r}")
                self.status_addr = value
                continue
            if key == "progress":
                if not isinstance(value, bool):
                    raise Error(f"option progress must be True or False, not {value!r}")
                self.progress = value
                continue
            if key == "tls":
                if not isinstance(value, bool):
                    raise Error(f"option tls must be True or False, not {value!r}")
                self.tls = value
                continue
            if key == "socket_buffer":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise Error(f"option socket_buffer must be a number of bytes >= 0, not {value!r}")
                self.socket_buffer = value
                continue
            if key not in ("keepalive_period", "lost_after", "lease", "start_timeout"):
                raise Error(f"unknown option {key!r} for {type(self).__name__}")
            if not isinstance(value, (int, float)) or value <= 0:
                raise Error(f"option {key} must be a positive number of seconds, not {value!r}")
            setattr(self, key, float(value))

    @abstractmethod
    def launch(self, creds: Credentials, names: list[str], timeout: float) -> list[Process]:
        """Launch one machine per name; return once each listens, with its address."""

    def shutdown(self) -> None:
        """Release what the system holds once the session's machines are stopped."""
