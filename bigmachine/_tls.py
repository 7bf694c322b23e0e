"""TLS for links that leave the host: a per-cluster CA and TLS 1.3 channels.

The driver makes the cluster's CA in memory; its private key never leaves the
driver's memory. Each member (driver and machines) gets its own key and
certificate signed by that CA, delivered over the bootstrap channel; the
certificate's common name is the member's name. Both sides of every
connection require a certificate chaining to the cluster CA, and only TLS 1.3
is spoken. Keys never touch a file system: OpenSSL reads them from an
anonymous memory file (memfd). Certificates live for ``lifetime`` seconds;
the driver renews every member's before half of it has passed (the CA's
certificate is re-issued under the same key, so old and new chains verify).

A connection's TLS runs over memory BIOs (``ssl.SSLObject``) rather than an
``SSLSocket`` so that the connection's reader thread and its writers (any
thread) can share it: the raw socket I/O stays ours, and a lock serialises
the calls into OpenSSL.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Optional

from ._sockio import Spin, recv_into
from .errors import AuthError

LIFETIME = 7 * 24 * 3600.0  # seconds a certificate is valid, by default
RECV_SIZE = 256 << 10


@dataclass(frozen=True)
class Identity:
    """A member's TLS material: the CA certificate, its own certificate and key (PEM)."""

    ca_pem: bytes   # one or more CA certificates (the same key, successive lifetimes)
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """(server context, client context), both requiring a peer certificate."""
        return _context(self, ssl.PROTOCOL_TLS_SERVER), _context(self, ssl.PROTOCOL_TLS_CLIENT)

    def to_dict(self) -> dict:
        return {"ca": self.ca_pem.decode(), "cert": self.cert_pem.decode(), "key": self.key_pem.decode()}

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        return cls(d["ca"].encode(), d["cert"].encode(), d["key"].encode())


def _context(identity: Identity, protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # membership is the CA's signature; the name is checked by us
    ctx.load_verify_locations(cadata=identity.ca_pem.decode())
    with _memory_file(identity.cert_pem) as cert_path, _memory_file(identity.key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class _memory_file:
    """A path to data held in memory, never on a file system.

    load_cert_chain reads paths only. /proc/self/fd/N of a memfd is a path whose
    bytes live in memory and vanish when the descriptor is closed; where there
    is no memfd (macOS), /dev/fd/N of a pipe holding the bytes (a few KiB, well
    within a pipe's buffer) is read the same way.
    """

    def __init__(self, data: bytes):
        if hasattr(os, "memfd_create"):
            self.fds = (os.memfd_create("bigmachine-tls", os.MFD_CLOEXEC),)
            self.path = f"/proc/self/fd/{self.fds[0]}"
            target = self.fds[0]
        else:
            r, w = os.pipe()
            self.fds = (r, w)
            self.path = f"/dev/fd/{r}"
            target = w
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(target, view):]
            if target != self.fds[0]:
                os.close(target)  # the reader sees the end of the data
                self.fds = self.fds[:1]
        except BaseException:
            self._close()
            raise

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def peer_name(obj: ssl.SSLObject) -> str:
    """The common name of a verified peer's certificate ("" if it has none)."""
    cert = obj.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


class ClusterCA:
    """The cluster's certificate authority, held in the driver's memory only."""

    def __init__(self, lifetime: float = LIFETIME) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ec = x509, hashes, ec
        self._serialization, self._NameOID = serialization, NameOID
        self.lifetime = lifetime
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bigmachine cluster CA")])
        self._pems: list[bytes] = []
        self.renew()

    def _validity(self) -> tuple[datetime.datetime, datetime.datetime]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return now - datetime.timedelta(minutes=5), now + datetime.timedelta(seconds=self.lifetime)

    def renew(self) -> None:
        """Re-issue the CA's own certificate under the same key for another lifetime.

        Members trust the last two CA certificates, so chains made under either
        verify while a renewal spreads through the cluster.
        """
        x509 = self._x509
        start, end = self._validity()
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end + datetime.timedelta(seconds=self.lifetime))  # outlives its members
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(self._key, self._hashes.SHA256())
        )
        self._pems = (self._pems + [cert.public_bytes(self._serialization.Encoding.PEM)])[-2:]
        self.ca_pem = b"".join(self._pems)

    def __repr__(self) -> str:
        return "<ClusterCA>"

    def issue(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Identity:
        """A fresh key and certificate for the member called name."""
        x509, NameOID = self._x509, self._NameOID
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        start, end = self._validity()
        alt = []
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self._key, self._hashes.SHA256())
        )
        ser = self._serialization
        key_pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        return Identity(self.ca_pem, cert.public_bytes(ser.Encoding.PEM), key_pem)


class TLSChannel:
    """TLS over a raw socket through memory BIOs, usable from several threads."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool):
        self.ctx = ctx
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # A server's OpenSSL state (about 30 KiB) is made once the client's
        # first bytes arrive (see handshake): idle unauthenticated connections
        # then cost next to nothing.
        self.obj: Optional[ssl.SSLObject] = (
            None if server_side else ctx.wrap_bio(self.incoming, self.outgoing, server_side=False))
        self.lock = threading.Lock()
        # The reader thread's ciphertext buffer, made on its first read (after the
        # handshake): a connection that has not authenticated must not cost
        # 256 KiB of memory (1000 idle ones would hold 256 MiB).
        self.raw: Optional[bytearray] = None

    # ---- the handshake phase, on an event loop with a non-blocking socket ----

    async def handshake(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str) -> None:
        if self.obj is None:  # server side: a TLS server starts by reading the ClientHello
            await self._fill(loop, sock, host)
            self.obj = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush(loop, sock)
                await self._fill(loop, sock, host)
            except ssl.SSLError as exc:
                await self._flush(loop, sock, quiet=True)
                raise AuthError(host, f"TLS handshake failed: {exc.reason or exc}") from exc
        await self._flush(loop, sock)

    async def _flush(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, quiet: bool = False) -> None:
        data = self.outgoing.read()
        if data:
            try:
                await loop.sock_sendall(sock, data)
            except OSError:
                if not quiet:
                    raise

    async def _fill(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str) -> None:
        data = await loop.sock_recv(sock, RECV_SIZE)
        if not data:
            raise AuthError(host, "the peer closed the connection during the TLS handshake")
        self.incoming.write(data)

    async def send(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
        self.obj.write(data)
        await self._flush(loop, sock)

    async def recv_into(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        view: memoryview, host: str) -> int:
        while True:
            try:
                return self.obj.read(len(view), view)
            except ssl.SSLWantReadError:
                await self._fill(loop, sock, host)
            except ssl.SSLError as exc:
                raise AuthError(host, f"TLS failed: {exc.reason or exc}") from exc

    # ---- the connection phase: blocking reads on the reader thread -----------

    def read_into(self, sock: socket.socket, view: memoryview, spin: Optional[Spin] = None) -> int:
        """Decrypt into view; 0 at the end of the stream. Blocks on the socket,
        busy-polling first as spin says (see _sockio)."""
        while True:
            with self.lock:
                # Try OpenSSL only with bytes to work on: a read that cannot
                # succeed raises (and formats) SSLWantReadError, most of a
                # small message's cost here.
                if self.incoming.pending or self.obj.pending():
                    try:
                        return self.obj.read(len(view), view)
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLZeroReturnError:
                        return 0
            raw = self.raw
            if raw is None:
                raw = self.raw = bytearray(RECV_SIZE)
            n = recv_into(sock, raw, 0, spin)
            if n == 0:
                return 0
            self.incoming.write(memoryview(raw)[:n])

    def encrypt(self, buffers: list) -> bytes:
        """The ciphertext of buffers, in order (callers serialise writes)."""
        with self.lock:
            for buf in buffers:
                self.obj.write(buf)
            return self.outgoing.read()

    def buffered(self) -> bool:
        """True if received bytes wait in the channel rather than in the socket."""
        with self.lock:
            return self.incoming.pending > 0 or self.obj.pending() > 0

    def pending_output(self) -> bytes:
        """Ciphertext OpenSSL produced while reading (e.g. a key update reply)."""
        with self.lock:
            return self.outgoing.read()
