"""bigmachine: spread one Python program over many machines.

    import bigmachine as bm

    @bm.service
    class Sampler:
        def sample(self, n): ...

    with bm.start() as b:
        m, = b.start(1, services={"Sampler": Sampler()})
        m.call("Sampler.sample", 10**6)
"""
from ._driver import start
from ._dispatch import cancelled
from ._machine import Machine, State
from ._session import B, current
from ._retry import retry
from ._profile import MemoryProfile, Profile
from ._service import service
from ._status import CallStats, MachineStatus, Status
from ._version import __version__
from .backends import Process, System
from .backends.inprocess import InProcess
from .backends.local import Local
from .backends.ssh import SSH
from .backends.ec2 import EC2
from .errors import AuthError, Error, MachineLost, ProtocolError, RemoteError, ResourceError

__all__ = [
    "B", "Machine", "State", "System", "Process", "Local", "InProcess", "SSH", "EC2",
    "start", "current", "service", "cancelled", "retry",
    "Status", "MachineStatus", "CallStats", "Profile", "MemoryProfile",
    "Error", "RemoteError", "MachineLost", "AuthError", "ProtocolError", "ResourceError",
    "__version__",
]
