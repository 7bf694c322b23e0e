"""The error types of bigmachine. Every error we raise derives from Error."""
from __future__ import annotations


class Error(Exception):
    """Base class of every error bigmachine raises itself."""


class RemoteError(Error):
    """A remote method raised an exception whose type cannot be rebuilt here."""

    def __init__(self, remote_type: str, message: str, remote_traceback: str = ""):
        super().__init__(remote_type, message, remote_traceback)
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.message}"


class MachineLost(Error):
    """The connection to a machine broke or its keepalives failed.

    A call that fails with MachineLost may or may not have executed on the
    machine: calls run at most once and are never retried behind your back.
    """

    def __init__(self, addr: str, reason: str = "connection lost"):
        super().__init__(addr, reason)
        self.addr = addr
        self.reason = reason

    def __str__(self) -> str:
        return f"machine {self.addr} lost: {self.reason} (a call in flight may have executed)"

    @classmethod
    def because(cls, addr: str, cause: BaseException) -> "MachineLost":
        """A fresh MachineLost for addr (one per raise), with cause as its __cause__."""
        lost = cls(addr, getattr(cause, "reason", None) or str(cause))
        lost.__cause__ = cause
        return lost


class AuthError(Error):
    """A peer failed the handshake, or an SSH host or key was refused."""

    def __init__(self, host: str, reason: str):
        super().__init__(host, reason)
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot authenticate {self.host}: {self.reason}"


class ResourceError(Error):
    """This process is short of descriptors or memory to take a message.

    The call fails; its connection stays usable.
    """


class ProtocolError(Error):
    """A peer sent a malformed frame or spoke another protocol."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason
