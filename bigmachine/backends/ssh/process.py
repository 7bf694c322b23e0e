"""A machine on an SSH host: the exec channel that runs it, and how it ends."""
from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from typing import Any, Optional

from ...errors import Error
from .._bootstrap import Output, Spawned
from .hosts import Host
from .tunnel import Forwarder

log = logging.getLogger("bigmachine.ssh")


class SSHProcess(Spawned):
    """A machine started through chan (an exec channel of client) in run_dir."""

    def __init__(self, host: Host, client: Any, name: str, run_dir: str, chan: Any):
        self.host = host
        self.client = client
        self.name = name
        self.run_dir = run_dir
        self.chan = chan
        self.addr = ""
        self.remote_addr = ""  # with a tunnel: the machine's own address on the host
        self.forwarder: Optional[Forwarder] = None
        self._stopped = False
        self._lock = threading.Lock()
        self.output = Output(f"{name} on {host.label}", f"{host.label} {name}: ")
        self.output.pump(chan.makefile("rb"), f"bigmachine-ssh-out-{name}", status=True)
        self.output.pump(chan.makefile_stderr("rb"), f"bigmachine-ssh-err-{name}")

    def forward(self) -> None:
        """Serve the machine on a local forwarding listener; it becomes our address."""
        self.forwarder = Forwarder(self.client, self.addr, f"{self.host.label} {self.name}")
        self.remote_addr, self.addr = self.addr, self.forwarder.addr

    def alive(self, wait: float = 0.0) -> bool:
        if wait:
            self.chan.status_event.wait(wait)
        return not self.chan.status_event.is_set()

    def describe_exit(self) -> str:
        if not self.chan.status_event.is_set():
            return "still running"
        code = self.chan.exit_status
        if code == -1:  # sshd sent exit-signal (paramiko ignores it), or the link broke
            transport = self.client.get_transport()
            if transport is not None and transport.is_active():
                return "killed by a signal (sshd reported no exit status)"
            return f"the SSH connection to {self.host.label} broke"
        if code > 128:
            return f"exit status {code} (signal {code - 128}?)"
        return f"exit status {code}"

    def settle(self) -> None:
        self.chan.status_event.wait(1.0)
        self.output.join(1.0)

    def stop(self, timeout: float, grace: float = 2.0) -> None:
        """Wait up to timeout for the machine to end; then close its stdin, and
        after grace seconds more SIGKILL its process group. Remove its run dir,
        unless the host could not be reached to kill it (a cut link: the
        machine then stops by its lease; its run dir stays)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        reached = True
        if not self.chan.status_event.wait(timeout):
            self.chan.shutdown_write()  # stdin EOF: the machine stops itself at once
            if not self.chan.status_event.wait(grace):
                reached = self.kill()
                if reached:
                    self.chan.status_event.wait(2.0)
        self.chan.close()
        if self.forwarder is not None:
            self.forwarder.close()
        self.host.release_session(self.client)
        self.output.join(2)
        if reached:
            self._cleanup()
        else:  # another command over the same dead link would only wait out its deadline
            log.warning("left the run dir %s on %s: the host did not answer", self.run_dir,
                        self.host.label)
        self.host.forget(self)

    def kill(self) -> bool:
        """SIGKILL the machine's process group on the host; False if that failed."""
        if self.output.pid is None:
            self.chan.close()  # sshd then closes the machine's stdin
            return True
        try:
            self.host.run(f"kill -KILL -- -{self.output.pid} 2>/dev/null; true",
                          time.monotonic() + 5.0, client=self.client)
        except Error as exc:
            log.warning("cannot kill machine %s on %s: %s", self.name, self.host.label, exc)
            return False
        return True

    def _cleanup(self) -> None:
        parent = os.path.dirname(self.run_dir)
        transport = self.client.get_transport()
        alive = transport is not None and transport.is_active()
        try:  # on a new connection if the machine's own is gone
            self.host.run(f"rm -rf {shlex.quote(self.run_dir)}; "
                          f"rmdir {shlex.quote(parent)} 2>/dev/null; true",
                          time.monotonic() + 10.0, client=self.client if alive else None)
        except Error as exc:
            log.warning("cannot remove %s on %s: %s", self.run_dir, self.host.label, exc)
