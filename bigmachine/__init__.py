"""bigmachine: spread one Python program over many machines.

    import bigmachine as bm

    @bm.service
    class Sampler:
        def sample(self, n): ...

    with bm.start() as b:
        m, = b.start(1, services={"Sampler": Sampler()})
        m.call("Sampler.sample", 10**6)

The driver's entry point (start), the systems and the status records are
imported where first used (PEP 562): a machine imports this package too (its
services do, and so does the template machines are forked from), and never
needs them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._dispatch import cancelled
from ._machine import Machine, State
from ._session import B, current
from ._retry import retry
from ._profile import MemoryProfile, Profile
from ._service import service
from ._version import __version__
from .backends import Process, System
from .errors import AuthError, Error, MachineLost, ProtocolError, RemoteError, ResourceError

if TYPE_CHECKING:
    from ._start import start
    from ._status import CallStats, MachineStatus, Status
    from .backends.ec2 import EC2
    from .backends.inprocess import InProcess
    from .backends.local import Local
    from .backends.ssh import SSH

# Public name -> the module that defines it, imported on first use.
_DRIVER_SIDE = {
    "start": "._start",
    "Local": ".backends.local",
    "InProcess": ".backends.inprocess",
    "SSH": ".backends.ssh",
    "EC2": ".backends.ec2",
    "Status": "._status",
    "MachineStatus": "._status",
    "CallStats": "._status",
}

__all__ = [
    "B", "Machine", "State", "System", "Process", "Local", "InProcess", "SSH", "EC2",
    "start", "current", "service", "cancelled", "retry",
    "Status", "MachineStatus", "CallStats", "Profile", "MemoryProfile",
    "Error", "RemoteError", "MachineLost", "AuthError", "ProtocolError", "ResourceError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the driver's side of the API when a program first uses it."""
    module = _DRIVER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
