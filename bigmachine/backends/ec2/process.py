"""A machine on an EC2 instance, and the instance with its agent's link and machines."""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

from .._bootstrap import Output, Spawned
from .instances import Instance
from .launch import Facts
from .link import AgentLink, Pipes


class Booted:
    """One instance this session launched: what EC2 last said of it, the link to its
    agent once open, and its machines that have not stopped."""

    def __init__(self, instance: Instance, facts: Facts):
        self.instance = instance
        self.facts = facts          # its type's vCPUs and memory (describe_instance_types)
        self.link: Optional[AgentLink] = None
        self.procs: list["EC2Process"] = []
        self.lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.instance.id


class EC2Process(Spawned):
    """A machine the agent on booted started; its output comes over the agent's link.

    suspect(instance id) asks the monitor to look at the instance (the driver
    lost touch); done(proc) tells the system it has stopped.
    """

    def __init__(self, booted: Booted, name: str, pipes: Pipes, addr: str,
                 suspect: Callable[[str], None], done: Callable[["EC2Process"], None]):
        self.booted = booted
        self.name = name
        self.pipes = pipes
        self.addr = addr
        self._suspect = suspect
        self._done = done
        self._stopped = False
        self._lock = threading.Lock()
        self.output = Output(f"{name} on {booted.id}", f"{booted.id} {name}: ")
        self.output.pump(pipes.stdout, f"bigmachine-ec2-out-{name}", status=True)
        self.output.pump(pipes.stderr, f"bigmachine-ec2-err-{name}")

    def host_facts(self) -> dict:
        instance, facts = self.booted.instance, self.booted.facts
        return {"instance": instance.id, "type": instance.type or facts.instance_type,
                "lifecycle": instance.lifecycle, "vcpus": facts.vcpus,
                "memory": facts.mem_bytes}

    def alive(self, wait: float = 0.0) -> bool:
        if self.pipes.exited.is_set() or self.booted.instance.gone:
            return False
        if wait:
            self._suspect(self.booted.id)
            self.pipes.exited.wait(wait)
        return not (self.pipes.exited.is_set() or self.booted.instance.gone)

    def describe_exit(self) -> str:
        instance = self.booted.instance
        if instance.gone:
            return instance.describe_state()
        status = self.pipes.status
        if status is not None:
            if status < 0:
                try:
                    return f"killed by {signal.Signals(-status).name}"
                except ValueError:
                    return f"killed by signal {-status}"
            return f"exit status {status}"
        link = self.booted.link
        if link is not None and link.broken.is_set():
            return f"the link to the agent on {instance.id} broke ({link.error})"
        return "still running"

    def stop(self, timeout: float) -> None:
        """Wait up to timeout for the machine to end, then have the agent kill it."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        link = self.booted.link
        if not self.pipes.exited.wait(timeout) and link is not None and not link.broken.is_set():
            link.kill(self.name)
            self.pipes.exited.wait(3.0)
        self.output.join(2.0)
        self._done(self)
