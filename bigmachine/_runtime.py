"""A machine's own session: what ``bigmachine.current()`` returns inside a service.

``start_machine`` turns a node into a serving machine: its Supervisor (which
watches the owner's lease), its listener and its own B, through which its
services call other machines.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ._machine import Machine
from ._node import Node
from ._session import B
from ._supervisor import Supervisor


class Runtime(B):
    """A machine's own session: ``machine`` is its handle on itself."""

    def __init__(self, node: Node, keepalive_period: float, lost_after: float):
        super().__init__(node, keepalive_period, lost_after)
        self.machine = Machine(node, node.addr, name=node.name, expect=node.name)


def start_machine(node: Node, lease: Optional[float], on_stop: Any, owner_token: bytes,
                  listen: str = "127.0.0.1:0", keepalive_period: float = 1.0,
                  lost_after: float = 5.0,
                  before_services: Optional[Callable[[], None]] = None) -> str:
    """Start serving on node at listen: Supervisor, listener, the machine's own B.
    Returns the address peers dial. lease None: the machine has no lease (it lives
    in its driver's process). before_services runs once, as the owner registers
    its services and before they are installed (see Supervisor)."""
    node.start_thread()
    node.registry.add("Supervisor", Supervisor(node, lease, on_stop, owner_token,
                                               before_services))
    addr = node.run_sync(node.listen(listen))
    Runtime(node, keepalive_period, lost_after)  # its timer starts with its first dial
    return addr
