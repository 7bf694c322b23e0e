"""Cluster credentials and the connection handshake.

Every connection opens with short binary messages, read with exact lengths
and deadlines, before any frame is decoded or anything unpickled. The dialler
speaks first and proves itself before the server says anything beyond its
protocol version::

    client -> server  HELLO   magic | version | python | client nonce
    server -> client  HELLO   magic | version | python | server nonce
    client -> server  PROOF   HMAC(secret, "client" | client hello | server hello)
    server -> client  PROOF   HMAC(secret, "server" | client hello | server hello | name)
                              | name length | name

A peer that has not proven membership learns no cluster id and no name: a
server reveals only its versions (so a user gets a clear error when they
differ). Fresh nonces on both sides defeat replay; the role labels stop a
peer from answering a challenge with the challenger's own words; a node
refuses a hello carrying the nonce of one of its own dials in progress (a
dialled peer relaying us to our own listener). The server's proof names the
member it is, so a dialler that knows whom it means (a Machine handle) is
never bound to another member relayed or recycled into that address.

The handshake authenticates the two ends only: the frames that follow are
protected by TLS on TCP links, and by the kernel on Unix sockets (a private
directory and the peer's credentials).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import AuthError, ProtocolError

MAGIC = b"\x89BGM\r\n\x1a\n"
VERSION = 2
PYTHON = (sys.version_info[0] << 8) | sys.version_info[1]
NONCE = 32
MAC = 32
TOKEN = 32          # an owner token's bytes
MAX_NAME = 255      # a member's name, in the server's proof
_HELLO = struct.Struct("<8sHH32s")
HELLO_SIZE = _HELLO.size
PROOF_SIZE = MAC
SERVER_PROOF_HEAD = MAC + 1  # the MAC and the name's length byte
FIRST_BYTE_TIMEOUT = 1.0     # an accepted peer must start its hello within this
HANDSHAKE_TIMEOUT = 5.0      # and finish the whole handshake within this
BOOTSTRAP_SIZE = 16 + 32 + TOKEN  # cluster id, secret, owner token


@dataclass(frozen=True)
class Credentials:
    """A cluster's identity and shared secret. Secrets never appear in repr.

    owner_key exists in the driver only: it derives each machine's owner
    token, which the machine receives with its bootstrap and which proves,
    on any connection, that a call comes from the machine's owner.
    """

    cluster_id: bytes
    secret: bytes = field(repr=False)
    ca: Any = field(default=None, repr=False, compare=False)  # driver only: a _tls.ClusterCA
    owner_key: Optional[bytes] = field(default=None, repr=False, compare=False)  # driver only

    @classmethod
    def generate(cls, ca: Any = None) -> "Credentials":
        """Fresh credentials for a new cluster, with ca as its certificate authority."""
        return cls(os.urandom(16), os.urandom(32), ca, os.urandom(32))

    def owner_token(self, name: str) -> bytes:
        """The token that proves ownership of the machine called name (driver only)."""
        if self.owner_key is None:
            raise AuthError(name, "only the driver holds owner tokens")
        return hmac.new(self.owner_key, b"owner" + name.encode(), hashlib.sha256).digest()

    def encode_for(self, name: str) -> bytes:
        """The bytes a new machine called name reads from its bootstrap channel."""
        return self.cluster_id + self.secret + self.owner_token(name)

    @classmethod
    def decode(cls, data: bytes) -> tuple["Credentials", bytes]:
        """(credentials, owner token) from encode_for's bytes."""
        if len(data) != BOOTSTRAP_SIZE:
            raise AuthError("bootstrap", "malformed credentials")
        return cls(data[:16], data[16:48]), data[48:]


def _mac(creds: Credentials, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(creds.secret, label + b"".join(parts), hashlib.sha256).digest()


def _python_str(code: int) -> str:
    return f"{code >> 8}.{code & 0xFF}"


def nonce(hello: bytes) -> bytes:
    """The nonce of a hello (its last field)."""
    return hello[HELLO_SIZE - NONCE:HELLO_SIZE]


def hello() -> bytes:
    """A fresh hello: our versions and a new nonce. It carries nothing secret."""
    return _HELLO.pack(MAGIC, VERSION, PYTHON, os.urandom(NONCE))


def check_versions(host: str, data: bytes) -> None:
    """Raise ProtocolError unless data is a hello of our protocol and Python versions."""
    magic, version, python, _ = _HELLO.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"{host} is not a bigmachine peer")
    if version != VERSION:
        raise ProtocolError(f"{host} speaks protocol version {version}; we speak {VERSION}")
    if python != PYTHON:
        raise ProtocolError(f"{host} runs Python {_python_str(python)}; we run {_python_str(PYTHON)}")


def client_proof(creds: Credentials, mine: bytes, theirs: bytes) -> bytes:
    """The dialler's proof of membership over both hellos."""
    return _mac(creds, b"client", mine, theirs)


def check_client_proof(creds: Credentials, theirs: bytes, mine: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(_mac(creds, b"client", theirs, mine), proof)


def server_proof(creds: Credentials, theirs: bytes, mine: bytes, name: str) -> bytes:
    """The server's proof of membership, naming the member it is."""
    encoded = name.encode()
    if len(encoded) > MAX_NAME:
        raise ProtocolError(f"member name {name[:40]!r}... is too long")
    return _mac(creds, b"server", theirs, mine, encoded) + bytes([len(encoded)]) + encoded


def check_server_proof(creds: Credentials, host: str, mine: bytes, theirs: bytes,
                       mac: bytes, name: bytes, member: Optional[str]) -> str:
    """Verify the server's proof; return its name, which must be member when given."""
    if not hmac.compare_digest(_mac(creds, b"server", mine, theirs, name), mac):
        raise AuthError(host, "it does not know the cluster secret")
    got = name.decode("utf-8", "replace")
    if member is not None and got != member:
        raise AuthError(host, f"it is member {got!r}, not {member!r} (a relayed or reused address)")
    return got


def check_token(expected: bytes, given: Any) -> bool:
    """Constant-time check of an owner token."""
    return isinstance(given, bytes) and hmac.compare_digest(expected, given)
