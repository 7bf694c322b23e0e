"""InProcess: machines inside the driver process, for users' own unit tests.

Each machine is a full node (its own IO loop thread, thread pool and
listener: a Unix socket in a private directory, or loopback TCP with
tls=True) spoken to over real sockets, so code tested here runs the same
protocol it will run on a cluster.
"""
from __future__ import annotations

from typing import Any, Optional

from .._auth import Credentials
from .._node import Node
from .._runtime import start_machine
from ..errors import Error
from . import Process, SocketDir, System


class _InProcessMachine(Process):
    def __init__(self, node: Node, addr: str):
        self.node = node
        self.addr = addr
        self.reason = ""

    def on_stop(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self.node.close()

    def alive(self, wait: float = 0.0) -> bool:
        return not self.node.closed

    def describe_exit(self) -> str:
        return self.reason or "stopped"

    def stop(self, timeout: float) -> None:
        if not self.node.closed:
            self.on_stop("stopped by the driver")


class InProcess(System):
    """Machines as nodes inside this process.

    They cannot outlive the driver's process, so they need no lease and the
    driver sends them no keepalives: it sees one end (``kill``, a stop) at
    once, without I/O. Hundreds of idle ones then cost the driver next to
    nothing. Calls, streams and failures of their links are as on any system.
    Large arrays travel as shared memory (``shared_memory=False`` turns it off).
    """

    name = "inprocess"
    shared_memory = True
    keepalives = False

    def __init__(self, **options: Any):
        self.sockets: Optional[SocketDir] = None
        self.configure(**options)

    @property
    def tcp(self) -> bool:
        return self.tls

    def launch(self, creds: Credentials, names: list[str], timeout: float,
               env: Optional[dict] = None) -> list[Process]:
        if env:
            raise Error("InProcess machines share the driver's environment: env= needs bm.Local()")
        machines = []
        if not self.tcp and self.sockets is None:
            self.sockets = SocketDir()
        for name in names:
            identity = creds.ca.issue(name) if creds.ca is not None else None
            machine_creds = Credentials(creds.cluster_id, creds.secret)  # no CA, no owner key
            node = Node(machine_creds, name, identity=identity, socket_buffer=self.socket_buffer,
                        shared_memory=self.shared_memory, busy_poll=self.busy_poll)
            holder: list = []
            listen = "127.0.0.1:0" if self.tcp else self.sockets.addr(name)
            addr = start_machine(node, None, lambda why, h=holder: h[0].on_stop(why),
                                 creds.owner_token(name), listen=listen,
                                 keepalive_period=self.keepalive_period, lost_after=self.lost_after)
            machine = _InProcessMachine(node, addr)
            holder.append(machine)
            machines.append(machine)
        return machines

    def kill(self, machine: Any) -> None:
        """Make an owned machine vanish as a crash would: its node stops at once, its
        connections drop without a goodbye, and the driver finds it gone (MachineLost)."""
        proc = machine.process
        if not isinstance(proc, _InProcessMachine):
            raise Error(f"{machine!r} is not a machine of this InProcess system")
        proc.on_stop("killed (InProcess.kill)")

    def shutdown(self) -> None:
        if self.sockets is not None:
            self.sockets.remove()
            self.sockets = None  # a later session of this system makes its own
