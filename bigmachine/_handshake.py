"""The two sides of the connection handshake (see ``_auth``) on an event loop.

Each runs on a non-blocking socket, inside TLS when the cluster uses it, and
reads only lengths it chose itself. Nothing here unpickles anything.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Optional

from . import _auth
from ._auth import Credentials
from ._tls import TLSChannel, peer_name
from .errors import AuthError, ProtocolError


async def serve(creds: Credentials, name: str, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                peer: str, tls: Optional[TLSChannel], dialing: set) -> Optional[TLSChannel]:
    """Authenticate a peer that dialled us; return its TLS channel (or None)."""
    channel = _Channel(loop, sock, peer, tls)
    if tls is not None:
        await tls.handshake(loop, sock, peer)
    theirs = await channel.recv_exact(_auth.HELLO_SIZE, magic=True)
    if _auth.nonce(theirs) in dialing:
        # Our own hello, relayed back to us by whoever we dialled.
        raise AuthError(peer, "it reflected our own handshake back to us")
    mine = _auth.hello()
    await channel.send(mine)  # our versions only: a stranger learns nothing else
    _auth.check_versions(peer, theirs)
    proof = await channel.recv_exact(_auth.PROOF_SIZE)
    if not _auth.check_client_proof(creds, theirs, mine, proof):
        raise AuthError(peer, "it does not know the cluster secret")
    await channel.send(_auth.server_proof(creds, theirs, mine, name))
    return tls


async def dial(creds: Credentials, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str,
               tls: Optional[TLSChannel], mine: bytes, expect: Optional[str]) -> str:
    """Authenticate to the peer we dialled (our hello is mine); return its member name.

    expect: the name of the member we mean to reach, when we know it.
    """
    channel = _Channel(loop, sock, host, tls)
    if tls is not None:
        await tls.handshake(loop, sock, host)
    await channel.send(mine)
    theirs = await channel.recv_exact(_auth.HELLO_SIZE, magic=True)
    _auth.check_versions(host, theirs)
    await channel.send(_auth.client_proof(creds, mine, theirs))
    head = await channel.recv_exact(_auth.SERVER_PROOF_HEAD)
    name = await channel.recv_exact(head[-1]) if head[-1] else b""
    got = _auth.check_server_proof(creds, host, mine, theirs, head[:-1], name, expect)
    if tls is not None and peer_name(tls.obj) != got:
        raise AuthError(host, f"its certificate names {peer_name(tls.obj)!r}, not {got!r}")
    return got


class _Channel:
    """Handshake I/O on a non-blocking socket, inside TLS when tls is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str,
                 tls: Optional[TLSChannel]):
        self.loop = loop
        self.sock = sock
        self.host = host
        self.tls = tls

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            await self.loop.sock_sendall(self.sock, data)
        else:
            await self.tls.send(self.loop, self.sock, data)

    async def recv_exact(self, n: int, magic: bool = False) -> bytes:
        """Read exactly n bytes (n is ours, never the peer's).

        With magic, the bytes must start with the protocol magic: a peer
        speaking anything else is refused as soon as its first bytes differ.
        """
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        m = len(_auth.MAGIC)
        while got < n:
            if self.tls is None:
                k = await self.loop.sock_recv_into(self.sock, view[got:])
            else:
                k = await self.tls.recv_into(self.loop, self.sock, view[got:], self.host)
            if k == 0:
                if got == 0:
                    raise AuthError(self.host, "the peer closed the connection during the handshake")
                raise AuthError(self.host, "handshake truncated")
            got += k
            if magic and buf[:min(got, m)] != _auth.MAGIC[:min(got, m)]:
                raise ProtocolError(f"not a bigmachine peer (it sent {bytes(buf[:min(got, 16)])!r})")
        return bytes(buf)
