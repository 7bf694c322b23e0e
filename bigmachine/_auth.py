"""Cluster credentials and the connection handshake.

Every connection opens with fixed-size binary messages, read with exact
lengths and a deadline, before any frame is decoded or anything unpickled::

    client -> server  HELLO   magic | version | python | cluster id | client nonce
    server -> client  HELLO   magic | version | python | cluster id | server nonce
                              | HMAC(secret, "server" | client hello | server nonce)
    client -> server  PROOF   HMAC(secret, "client" | client hello | server hello)
    server -> client  OK      one byte

Fresh nonces on both sides defeat replay; the role labels stop a peer from
answering a challenge with the challenger's own words, and a node refuses a
hello carrying the nonce of one of its own dials in progress (a dialed peer
relaying us to our own listener).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthError, ProtocolError

MAGIC = b"\x89BGM\r\n\x1a\n"
VERSION = 1
PYTHON = (sys.version_info[0] << 8) | sys.version_info[1]
NONCE = 32
MAC = 32
_HELLO = struct.Struct("<8sHH16s32s")
HELLO_SIZE = _HELLO.size
SERVER_HELLO_SIZE = HELLO_SIZE + MAC
PROOF_SIZE = MAC
OK = b"\x01"
HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Credentials:
    """A cluster's identity and shared secret. The secret never appears in repr."""

    cluster_id: bytes
    secret: bytes = field(repr=False)
    ca: Any = field(default=None, repr=False, compare=False)  # driver only: a _tls.ClusterCA

    @classmethod
    def generate(cls, tls: bool = False) -> "Credentials":
        """Fresh credentials; with tls, also the cluster's certificate authority."""
        ca = None
        if tls:
            from ._tls import ClusterCA
            ca = ClusterCA()
        return cls(os.urandom(16), os.urandom(32), ca)

    def encode(self) -> bytes:
        """The bytes a new machine reads from its bootstrap pipe."""
        return self.cluster_id + self.secret

    @classmethod
    def decode(cls, data: bytes) -> "Credentials":
        if len(data) != 48:
            raise AuthError("bootstrap", "malformed credentials")
        return cls(data[:16], data[16:])


def _mac(creds: Credentials, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(creds.secret, label + b"".join(parts), hashlib.sha256).digest()


def _python_str(code: int) -> str:
    return f"{code >> 8}.{code & 0xFF}"


def nonce(hello: bytes) -> bytes:
    """The nonce of a hello (the last field)."""
    return hello[HELLO_SIZE - NONCE:HELLO_SIZE]


def client_hello(creds: Credentials) -> bytes:
    return _HELLO.pack(MAGIC, VERSION, PYTHON, creds.cluster_id, os.urandom(NONCE))


def check_server_hello(creds: Credentials, host: str, hello: bytes, reply: bytes) -> bytes:
    """Verify the server's hello; return the client's proof."""
    if len(reply) != SERVER_HELLO_SIZE:
        raise AuthError(host, "handshake truncated")
    magic, version, python, cluster_id, _ = _HELLO.unpack(reply[:HELLO_SIZE])
    if magic != MAGIC:
        raise ProtocolError(f"{host} is not a bigmachine peer")
    if version != VERSION:
        raise ProtocolError(f"{host} speaks protocol version {version}; we speak {VERSION}")
    if python != PYTHON:
        raise ProtocolError(f"{host} runs Python {_python_str(python)}; we run {_python_str(PYTHON)}")
    if not hmac.compare_digest(cluster_id, creds.cluster_id):
        raise AuthError(host, "it belongs to another cluster")
    expect = _mac(creds, b"server", hello, reply[:HELLO_SIZE])
    if not hmac.compare_digest(expect, reply[HELLO_SIZE:]):
        raise AuthError(host, "it does not know the cluster secret")
    return _mac(creds, b"client", hello, reply)


def server_reply(creds: Credentials, hello: bytes) -> tuple[bytes, bool]:
    """Return (server hello, acceptable) for a client's hello.

    An unacceptable client still gets our hello (with an empty MAC) so it can
    report which versions differ; then the server closes.
    """
    magic, version, python, cluster_id, _ = _HELLO.unpack(hello)
    if magic != MAGIC:
        raise ProtocolError("not a bigmachine peer")
    mine = _HELLO.pack(MAGIC, VERSION, PYTHON, creds.cluster_id, os.urandom(NONCE))
    ok = (version == VERSION and python == PYTHON
          and hmac.compare_digest(cluster_id, creds.cluster_id))
    mac = _mac(creds, b"server", hello, mine) if ok else bytes(MAC)
    return mine + mac, ok


def check_client_proof(creds: Credentials, hello: bytes, reply: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(_mac(creds, b"client", hello, reply), proof)
