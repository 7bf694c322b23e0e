"""Systems: the ways machines are launched. One module per system.

A System launches machine processes and hands back a Process handle for
each; the driver's B does the rest (connecting, registering services,
keepalives) the same way for every system.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from typing import Any, Optional

from .._auth import Credentials
from .._sockopts import BUSY_POLL, SOCKET_BUFFER
from .._tls import LIFETIME
from ..errors import Error

log = logging.getLogger("bigmachine")
_warned_insecure = False
# Longer busy-polling wastes more CPU on every slow reply than a sleep costs.
MAX_BUSY_POLL = 0.001


class SocketDir:
    """A private (0700) directory for the Unix sockets of one session's machines."""

    def __init__(self) -> None:
        base = tempfile.gettempdir()
        if len(base) > 60:  # a socket path must fit in 108 bytes
            base = "/tmp"
        try:
            self.path = tempfile.mkdtemp(prefix="bigmachine-", dir=base)  # mode 0700
        except OSError as exc:
            raise Error(f"cannot make a directory for the machines' sockets in {base}: {exc}") from exc
        st = os.lstat(self.path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise Error(f"socket directory {self.path} is not private")

    def addr(self, name: str) -> str:
        return f"unix:{self.path}/{name}.sock"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Process(ABC):
    """A system's handle on one launched machine."""

    addr: str
    cert_hosts: tuple = ("127.0.0.1",)  # the addresses its TLS certificate names

    @abstractmethod
    def alive(self, wait: float = 0.0) -> bool:
        """True while the machine runs; waits up to `wait` seconds for it to end."""

    @abstractmethod
    def describe_exit(self) -> str:
        """How the machine ended, for error messages."""

    @abstractmethod
    def stop(self, timeout: float) -> None:
        """Wait up to timeout for the machine to end, then kill it; collect its output."""

    def error(self, what: str) -> Error:
        """An error saying the machine did what (e.g. "exited while starting"), how it
        ended, and its last output where the system kept it."""
        return Error(f"machine {what} ({self.describe_exit()})")

    def host_facts(self) -> dict:
        """What the system knows of where the machine runs, for status (e.g. an EC2
        instance's id, type, vCPUs and memory); empty when it has nothing to add."""
        return {}

    def local_pid(self) -> Optional[int]:
        """The machine's process id when it is a process of this host, else None."""
        return None


class System(ABC):
    """How machines are launched, and the timing of their keepalives.

    keepalive_period: seconds between the driver's keepalives.
    lost_after: seconds without any reply before the driver declares a
        machine lost, and how long it re-dials a machine whose link broke
        (also the connection's TCP_USER_TIMEOUT).
    lease: seconds a machine lives on without keepalives before it stops
        itself; it must exceed lost_after plus keepalive_period.
    start_timeout: seconds b.start() waits for a machine to come up.
    tls: every connection of the cluster is TLS 1.3 with certificates of a
        per-cluster CA (inside it, the secret handshake still runs). A system
        whose links are TCP refuses tls=False unless insecure=True is also given.
    insecure: allow plain TCP links (tls=False): anyone on the path between
        hosts can then read and rewrite calls. Logs a warning.
    shared_memory: on Unix-socket links (one host), out-of-band buffers of 1 MiB
        or more travel as shared memory: the sender copies each into a reused,
        pre-faulted segment of its pool, and a received array passed on costs
        no copy (see README "Performance"). On by default for Local and
        InProcess, whose links are Unix sockets; False keeps every byte on the
        socket. Links over TCP (TLS) never use it.
    cert_lifetime: seconds a member's certificate is valid; the session
        renews every member's certificate before half of it has passed.
    socket_buffer: kernel socket buffer bytes of the cluster's connections
        (small on local links keeps pings prompt beside bulk transfers);
        0 leaves them to the kernel's autotuning, for long-distance links.
    busy_poll: seconds (at most 0.001) a connection's reader, and a member's
        event loop, busy-poll before they sleep, while what they wait for comes that fast:
        a small call's wake-ups cost more than the call (see README
        "Performance"). 0 never polls, for hosts whose CPUs are all busy.
    status_addr: "host:port" where the driver serves its status page (None:
        no page); give a loopback host unless others must reach it.
    progress: show progress bars on a terminal (starting machines, large
        transfers); never when stderr is not a terminal.
    """

    name = "system"
    keepalive_period = 1.0
    lost_after = 5.0
    lease = 10.0
    start_timeout = 60.0
    tls = False
    insecure = False
    shared_memory = False
    cert_lifetime = LIFETIME
    socket_buffer = SOCKET_BUFFER
    busy_poll = BUSY_POLL
    status_addr: Optional[str] = None
    progress = True

    # Whether the driver keeps its machines alive with keepalives and a lease:
    # machines that live inside the driver's process cannot outlive it, and the
    # driver sees them end without I/O.
    keepalives = True

    @property
    def tcp(self) -> bool:
        """Whether the machines' links are TCP (else Unix sockets on this host)."""
        return True

    def configure(self, **options: Any) -> None:
        """Set options: tls, insecure, cert_lifetime, socket_buffer, busy_poll, status_addr,
        progress, and timing (keepalive_period, lost_after, lease, start_timeout)."""
        for key, value in options.items():
            if key == "status_addr":
                if value is not None and not isinstance(value, str):
                    raise Error(f"option status_addr must be 'host:port' or None, not {value!r}")
                self.status_addr = value
                continue
            if key in ("tls", "insecure", "progress", "shared_memory"):
                if not isinstance(value, bool):
                    raise Error(f"option {key} must be True or False, not {value!r}")
                setattr(self, key, value)
                continue
            if key == "socket_buffer":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise Error(f"option socket_buffer must be a number of bytes >= 0, not {value!r}")
                self.socket_buffer = value
                continue
            if key == "busy_poll":
                if (not isinstance(value, (int, float)) or isinstance(value, bool)
                        or not 0 <= value <= MAX_BUSY_POLL):
                    raise Error(f"option busy_poll must be seconds from 0 to {MAX_BUSY_POLL:g}, "
                                f"not {value!r}")
                self.busy_poll = float(value)
                continue
            if key not in ("keepalive_period", "lost_after", "lease", "start_timeout",
                           "cert_lifetime"):
                raise Error(f"unknown option {key!r} for {type(self).__name__}")
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise Error(f"option {key} must be a positive number of seconds, not {value!r}")
            setattr(self, key, float(value))

    def check(self) -> None:
        """Refuse settings that cannot work: a lease that ends before the driver gives
        up re-dialling, and plain TCP unless insecure=True (then warn once per process)."""
        global _warned_insecure
        if self.keepalives and self.lease <= self.lost_after + self.keepalive_period:
            raise Error(f"lease ({self.lease:g} s) must exceed lost_after ({self.lost_after:g} s) "
                        f"plus keepalive_period ({self.keepalive_period:g} s): a machine must not "
                        "stop itself while its driver may still re-dial it")
        if not self.tcp or self.tls:
            return
        if not self.insecure:
            raise Error(f"{type(self).__name__} links are TCP and tls=False would send calls in "
                        "the clear, open to reading and rewriting on the way; keep TLS, or pass "
                        "insecure=True as well if you accept that")
        if not _warned_insecure:
            _warned_insecure = True
            log.warning("insecure=True: %s links are plain TCP; anyone on the path can read "
                        "and rewrite calls", type(self).__name__)

    def init(self) -> None:
        """Prepare to launch machines (as Go's System.Init): bm.start() calls it before it
        makes the driver's session, so that slow work (a Local template) overlaps that;
        shutdown() undoes it, also when init raised."""

    @abstractmethod
    def launch(self, creds: Credentials, names: list[str], timeout: float,
               env: Optional[dict] = None) -> list[Any]:
        """Launch one machine per name, with env added to its environment; return once
        each listens, with its address.

        The list holds, for each name, its Process, or the exception that kept that
        machine from starting (a host that could not be reached, an instance that
        did not boot) when others could. Raise when none could, after ending what
        was launched.
        """

    def shutdown(self) -> None:
        """Release what the system holds once the session's machines are stopped."""
