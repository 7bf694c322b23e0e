"""The driver's link to an instance's agent (remote/ec2_agent.py).

The driver dials the instance's address, retrying refused and unreachable
connections until its deadline (the agent listens only once the instance has
booted), speaks TLS 1.3 pinned to the agent's one-time certificate, and
proves itself with the one-time token. Over the link it then runs commands
(a _remote.Run, for the host's cache) and starts machines, whose output and
exit status come back on it. Frames as the agent's: JSON length and data
length (big-endian u32 each), the JSON, the data.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import itertools
import json
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import IO, Any, Optional, Sequence

from ..._tls import TLSChannel
from ...errors import AuthError, Error
from .userdata import OneTime

log = logging.getLogger("bigmachine.ec2")

HEAD = struct.Struct(">II")
MAX_JSON = 1 << 20
MAX_DATA = 1 << 30
SEND_TIMEOUT = 10.0  # seconds a frame without a deadline of its own may take to send
RETRIED = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
           errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN}


class Pipes:
    """One machine's output as the agent sends it: two pipes that Output pumps, and
    its exit status once the agent reports it."""

    def __init__(self) -> None:
        out_r, self._out = os.pipe()
        err_r, self._err = os.pipe()
        self.stdout: IO[bytes] = os.fdopen(out_r, "rb")
        self.stderr: IO[bytes] = os.fdopen(err_r, "rb")
        self.status: Optional[int] = None
        self.exited = threading.Event()

    def write(self, fd: int, data: bytes) -> None:
        target = self._out if fd == 1 else self._err
        if target < 0:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(target, view):]
        except OSError:
            pass  # nobody reads: the driver is shutting down

    def close(self, status: Optional[int]) -> None:
        """The machine ended with status (None: the link broke, its end is unknown)."""
        if status is not None:
            self.status = status
            self.exited.set()
        for fd in (self._out, self._err):
            if fd >= 0:
                os.close(fd)
        self._out = self._err = -1


class AgentLink:
    """An open, accepted link to the agent on the instance called label."""

    def __init__(self, label: str, sock: socket.socket, chan: TLSChannel):
        self.label = label
        self.sock = sock
        self.chan = chan
        self.setup: dict = {}
        self.broken = threading.Event()
        self.error: Optional[str] = None
        self.on_broken: list[Any] = []  # called (from the reader) when it breaks, unless closed
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._replies: dict[int, list] = {}  # id -> [event, msg, data]
        self._machines: dict[str, Pipes] = {}
        self._closing = False

    # ---- opening

    @classmethod
    def open(cls, label: str, ip: str, port: int, one: OneTime, deadline: float,
             budget: float, cancel: threading.Event) -> "AgentLink":
        """Dial, pin, prove; return once the agent answered hello (its setup has run)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the one-time certificate is pinned below
        last: BaseException = Error("no attempt")
        pause = 0.1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Error(f"{label}: its agent did not answer at {ip}:{port} within "
                            f"boot_timeout ({budget:g} s; last attempt: {last}). The instance "
                            f"may still be booting, its security groups may not admit this "
                            f"driver on port {port}, or its AMI lacks the python= command: "
                            "its console output tells (aws ec2 get-console-output "
                            f"--instance-id {label.split()[0]})")
            try:
                sock = socket.create_connection((ip, port), timeout=min(left, 5.0))
            except OSError as exc:
                if isinstance(exc, socket.timeout) or exc.errno in RETRIED:
                    last = exc
                    if cancel.wait(min(pause, max(0.0, deadline - time.monotonic()))):
                        raise Error(f"{label}: the launch was cancelled") from None
                    pause = min(pause * 1.5, 2.0)
                    continue
                raise Error(f"{label}: cannot connect to its agent at {ip}:{port}: {exc}") \
                    from exc
            try:
                chan = cls._handshake(label, sock, ctx, one, min(left, 15.0))
            except (OSError, AuthError, asyncio.TimeoutError) as exc:
                sock.close()
                if isinstance(exc, AuthError) and "pinned" in exc.reason:
                    raise
                last = exc
                if cancel.wait(min(pause, max(0.0, deadline - time.monotonic()))):
                    raise Error(f"{label}: the launch was cancelled") from None
                continue
            link = cls(label, sock, chan)
            threading.Thread(target=link._read_loop, daemon=True,
                             name=f"bigmachine-ec2-agent-{label.split()[0]}").start()
            try:
                link._send({"op": "hello", "token": one.token.hex()}, deadline=deadline)
                msg, _ = link._wait(0, deadline, "hello")
            except BaseException:
                link.close()  # its socket and reader: nobody else holds this link
                raise
            link.setup = msg.get("setup") or {}
            return link

    @staticmethod
    def _handshake(label: str, sock: socket.socket, ctx: ssl.SSLContext, one: OneTime,
                   timeout: float) -> TLSChannel:
        chan = TLSChannel(ctx, server_side=False)
        sock.setblocking(False)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(asyncio.wait_for(chan.handshake(loop, sock, label), timeout))
        finally:
            loop.close()
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        cert = chan.obj.getpeercert(binary_form=True) if chan.obj is not None else None
        if not cert or not hmac.compare_digest(hashlib.sha256(cert).digest(), one.fingerprint):
            raise AuthError(label, "the agent's certificate is not the pinned one of its "
                                   "user-data: something else answers at its address")
        return chan

    # ---- requests

    def run(self, argv: Sequence[str], stdin: bytes, deadline: float) -> tuple[int, bytes, bytes]:
        """Run argv on the instance (a _remote.Run): (exit status, stdout, stderr)."""
        rid = next(self._ids)
        self._expect(rid)
        self._send({"op": "run", "id": rid, "argv": list(argv)}, stdin, deadline)
        msg, data = self._wait(rid, deadline, "a command")
        return msg["status"], data[:msg["out"]], data[msg["out"]:]

    def start(self, name: str, argv: Sequence[str], env: dict, cwd: str, bootstrap: bytes,
              deadline: float) -> Pipes:
        """Start a machine; its bootstrap goes to its stdin. Returns its output pipes."""
        pipes = Pipes()
        with self._lock:
            self._machines[name] = pipes
        rid = next(self._ids)
        self._expect(rid)
        self._send({"op": "start", "id": rid, "name": name, "argv": list(argv), "env": env,
                    "cwd": cwd}, bootstrap, deadline)
        try:
            self._wait(rid, deadline, f"the start of {name}")
        except BaseException:
            with self._lock:
                self._machines.pop(name, None)
            pipes.close(None)
            raise
        return pipes

    def kill(self, name: str) -> None:
        """SIGKILL the machine's process group (its exit follows on the link)."""
        try:
            self._send({"op": "kill", "name": name})
        except Error:
            pass

    def close(self) -> None:
        """Close the link: once its machines are done, the agent powers the instance off."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _expect(self, rid: int) -> None:
        with self._lock:
            self._replies[rid] = [threading.Event(), None, b""]

    def _wait(self, rid: int, deadline: float, what: str) -> tuple[dict, bytes]:
        with self._lock:
            slot = self._replies.setdefault(rid, [threading.Event(), None, b""])
        try:
            if not slot[0].wait(max(0.0, deadline - time.monotonic())):
                raise Error(f"{self.label}: its agent did not answer {what} in time")
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        msg = slot[1]
        if msg is None:
            raise Error(f"{self.label}: the link to its agent broke ({self.error})")
        if "error" in msg:
            raise Error(f"{self.label}: {msg['error']}")
        return msg, slot[2]

    def _send(self, msg: dict, data: bytes = b"", deadline: Optional[float] = None) -> None:
        """Send one frame by deadline (default: SEND_TIMEOUT from now); an agent that
        does not take it by then is an Error, and the link, cut mid-frame, is closed."""
        body = json.dumps(msg).encode()
        if deadline is None:
            deadline = time.monotonic() + SEND_TIMEOUT
        with self._send_lock:
            if self.broken.is_set():
                raise Error(f"{self.label}: the link to its agent broke ({self.error})")
            wire = memoryview(self.chan.encrypt([HEAD.pack(len(body), len(data)), body, data]))
            room = select.poll()  # not select(): the driver's descriptors may be above 1023
            room.register(self.sock, select.POLLOUT)
            try:
                while wire:
                    left = deadline - time.monotonic()
                    if left <= 0 or not room.poll(left * 1000):
                        self.close()
                        raise Error(f"{self.label}: its agent did not take {msg['op']} in time")
                    try:
                        wire = wire[self.sock.send(wire, socket.MSG_DONTWAIT):]
                    except (BlockingIOError, InterruptedError):
                        continue
            except OSError as exc:
                raise Error(f"{self.label}: cannot send to its agent: {exc}") from exc

    # ---- the reader

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.chan.read_into(self.sock, view[got:])
            if k == 0:
                raise EOFError("the agent closed the link")
            got += k
            pending = self.chan.pending_output()
            if pending:
                with self._send_lock:
                    self.sock.sendall(pending)
        return bytes(buf)

    def _read_loop(self) -> None:
        try:
            while True:
                size, length = HEAD.unpack(self._read_exact(HEAD.size))
                if size > MAX_JSON or length > MAX_DATA:
                    raise ValueError(f"a frame of {size} + {length} bytes")
                msg = json.loads(self._read_exact(size))
                data = self._read_exact(length) if length else b""
                self._on_frame(msg, data)
        except (OSError, EOFError, ValueError, ssl.SSLError, AuthError) as exc:
            self.error = "closed by the driver" if self._closing else str(exc) or type(exc).__name__
        with self._lock:
            self.broken.set()
            slots = list(self._replies.values())
            machines, self._machines = list(self._machines.values()), {}
        for slot in slots:
            slot[0].set()
        for pipes in machines:
            pipes.close(None)
        if not self._closing:
            for callback in self.on_broken:
                callback(self)

    def _on_frame(self, msg: dict, data: bytes) -> None:
        op = msg.get("op")
        if op == "out":
            with self._lock:
                pipes = self._machines.get(msg["name"])
            if pipes is not None:
                pipes.write(msg["fd"], data)
        elif op == "exit":
            with self._lock:
                pipes = self._machines.pop(msg["name"], None)
            if pipes is not None:
                pipes.close(msg["status"])
        else:
            with self._lock:
                slot = self._replies.setdefault(msg.get("id", 0), [threading.Event(), None, b""])
            slot[1], slot[2] = msg, data
            slot[0].set()
