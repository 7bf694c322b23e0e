"""The machine side: the built-in Supervisor service and the machine's lease.

Every machine serves ``Supervisor``. Its owner (the driver that started it)
proves itself with the owner token the machine received in its bootstrap, not
by which connection it calls on: only the owner may ``register`` services
(once, running their ``init``), ``claim`` it after re-dialling, ``renew`` its
certificate or ``shutdown`` the machine. The connection that registered (or
claimed) carries the owner's keepalives (PING frames, answered by the
connection's reader), which renew the machine's lease; when the lease runs
out the machine stops itself. A broken link alone does not stop it: its owner
re-dials within lost_after, which is shorter than the lease. Other members
may call the rest (``ping``, ``info``, ``stats``, ``status``, profiles).
"""
from __future__ import annotations

import asyncio
import logging
import os
import platform
import resource
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from . import _health, _logforward, _profile, _resources
from ._version import __version__
from ._auth import check_token
from ._connection import Connection
from ._dispatch import calling_connection
from ._node import Node
from ._service import service
from ._tls import Identity
from .errors import AuthError, Error

log = logging.getLogger("bigmachine.supervisor")

BOOT_TIMEOUT = 60.0  # how long a machine waits for its owner to begin registering


@service
class Supervisor:
    """Built-in service on every machine."""

    def __init__(self, node: Node, lease: Optional[float], on_stop: Any, owner_token: bytes,
                 before_services: Optional[Callable[[], None]] = None):
        self._node = node
        # Run once as the owner registers, before any service is installed: the last
        # moment before services can compute (a forked machine restores its thread pools).
        self._before_services = before_services
        self._lease = lease
        self._on_stop = on_stop
        self._token = owner_token
        self._owner: Optional[Connection] = None
        self._registering: Optional[Connection] = None  # the owner's link while init runs
        self._forwarder: Optional[_logforward.Forwarder] = None  # ships records to the owner
        self._started = time.time()
        self._lock = threading.Lock()
        self.health = _health.watch(node)
        node.loop.call_soon_threadsafe(lambda: node.loop.create_task(self._watchdog()))

    def _check_owner(self, token: Any, what: str) -> None:
        if not check_token(self._token, token):
            raise AuthError(self._node.name, f"only its owner may {what}")

    def register(self, services: dict, lease: Optional[float] = None, token: Any = None,
                 log_level: Optional[int] = None, driver_process: str = "") -> None:
        """Install services and run their init (owner only); this connection keeps the lease.

        With log_level, this machine's log records at that level or above go to the
        caller from now on (see _logforward), unless the caller is this very process
        (driver_process, see _logforward.this_process): its records are there already.
        """
        self._check_owner(token, "register services")
        caller = calling_connection()
        with self._lock:
            if self._owner is not None:
                raise Error("this machine already has an owner")
            if lease is not None:
                self._lease = lease
            self._registering = caller  # the boot clock stops: init may take its time
            if (log_level is not None and driver_process != _logforward.this_process()
                    and caller is not None):
                self._forwarder = _logforward.Forwarder(self._node.name, caller, log_level,
                                                        self._node.loop)
            if self._before_services is not None:
                self._before_services()
                self._before_services = None
            for name, inst in services.items():
                self._node.registry.add(name, inst)
            try:
                for name, inst in services.items():
                    init = getattr(inst, "init", None)
                    if callable(init):
                        init(self._node.b.machine)
            except BaseException:
                # A machine whose init failed serves no one: it stops itself
                # once the error has had time to reach its would-be owner.
                self._node.loop.call_soon_threadsafe(
                    self._node.loop.call_later, 0.5, self._on_stop, "its services' init failed")
                raise
            self._owner = caller
            self._node.set_owner(self._owner)

    def claim(self, token: Any = None) -> None:
        """The owner re-dialled: its keepalives come on the calling connection from now on,
        and this machine's log records go there (they ended with the old one)."""
        self._check_owner(token, "claim it")
        caller = calling_connection()
        with self._lock:
            if self._owner is None:
                raise Error("this machine has no owner yet: register first")
            self._owner = caller if caller is not None else self._owner
            self._node.set_owner(self._owner)
            old = self._forwarder
            if old is not None and old.conn is not self._owner:  # its records come here now
                old.stop()
                self._forwarder = _logforward.Forwarder(old.name, self._owner, old.level,
                                                        self._node.loop)

    def ping(self) -> str:
        return "pong"

    def info(self) -> dict:
        return {
            "name": self._node.name,
            "addr": self._node.addr,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "bigmachine": __version__,
            "started": self._started,
            "services": sorted(self._node.registry.services),
            "hostname": socket.gethostname(),
            "cpus": _resources.usable_cpus(),
            "mem_total": _resources.memory()["mem_total"],
        }

    def stats(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        disk = shutil.disk_usage(tempfile.gettempdir())
        return {
            "maxrss_bytes": usage.ru_maxrss * 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "loadavg": os.getloadavg(),
            "disk_total": disk.total,
            "disk_free": disk.free,
            "open_calls": sum(len(c.incoming) for c in self._all_connections()),
            "uptime": time.time() - self._started,
        }

    async def shutdown(self, token: Any = None, delay: float = 0.05) -> None:
        """Stop this machine shortly after replying (owner only).

        A coroutine, so that it runs on the IO loop even when every worker
        thread is busy with the owner's calls.
        """
        self._check_owner(token, "shut it down")
        asyncio.get_running_loop().call_later(delay, self._on_stop, "shut down by its owner")

    def renew(self, identity: dict, token: Any = None) -> None:
        """Use a new certificate (and CA chain) for connections from now on (owner only)."""
        self._check_owner(token, "renew its certificate")
        self._node.set_identity(Identity.from_dict(identity))

    def _all_connections(self) -> list:
        conns = list(self._node.connections.values())
        if self._owner is not None:
            conns.append(self._owner)
        return conns

    async def _watchdog(self) -> None:
        """Stop the machine when its owner stops renewing the lease, or does not begin
        to register within BOOT_TIMEOUT (once it has, the services' init may take
        as long as it takes, while the registering link stays open).

        It sleeps until the lease could end, not on a fixed tick: an idle machine
        wakes about once per lease, however many share a process.
        """
        boot_deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            owner = self._owner
            now = time.monotonic()
            if owner is None:
                registering = self._registering
                if registering is not None:  # its services' init runs, for as long as it takes
                    if registering.closed:
                        self._on_stop("its owner went away while its services' init ran")
                        return
                    await asyncio.sleep(0.5)
                    continue
                if now > boot_deadline:
                    self._on_stop(f"no owner registered within {BOOT_TIMEOUT} s")
                    return
                await asyncio.sleep(min(0.5, boot_deadline - now + 0.01))
                continue
            if self._lease is None:
                return  # no lease: the machine lives in its driver's process
            ends = owner.last_recv + self._lease
            if now > ends:
                self._on_stop(f"lease expired: no keepalive for {self._lease} s")
                return
            await asyncio.sleep(ends - now + 0.01)

    def status(self) -> dict:
        """This machine's figures for b.status(): resources, memory health, calls served."""
        return {
            "name": self._node.name,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "uptime": time.time() - self._started,
            "cpus": _resources.usable_cpus(),
            "load1": os.getloadavg()[0],
            **self.health.check(),
            "calls": self._node.dispatcher.counters.snapshot(),
        }

    def profile(self, seconds: float, hz: float = _profile.HZ) -> list:
        """Stack samples of every thread for seconds (see _profile.sample)."""
        return _profile.sample(seconds, hz)

    def memory_profile(self, seconds: float, top: int = 20) -> list:
        """The top allocation sites of a window of seconds (see _profile.allocation_sites)."""
        return _profile.allocation_sites(seconds, top)

