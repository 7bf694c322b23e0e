"""SSH hosts: the connections to each (paramiko), and commands run on them.

A host gets one SSH connection for short commands and as many more as its
machines need (sshd allows 10 sessions per connection by default).
"""
from __future__ import annotations

import getpass
import os
import select
import socket
import threading
import time
from typing import Any, Optional, Sequence

from ...errors import AuthError, Error
from .._shell import join
from .hostkeys import HostKeyPolicy, changed_key_error

MACHINES_PER_CONNECTION = 8  # sshd's MaxSessions defaults to 10; leave room for short execs


def load_paramiko() -> Any:
    """paramiko, imported on first use: machines import this module without it."""
    try:
        import paramiko
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise Error("bigmachine.SSH needs paramiko: pip install paramiko") from exc
    return paramiko


def parse_host(spec: str, user: Optional[str], port: int) -> tuple[str, Optional[str], int]:
    """'host', 'user@host', 'host:port', 'user@[::1]:port' -> (host, user, port)."""
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif spec.count(":") == 1 and spec.rpartition(":")[2].isdigit():
        host, port = spec.split(":")[0], int(spec.split(":")[1])
    else:
        host = spec
    if not host:
        raise Error(f"malformed SSH host {spec!r}")
    return host, user, port


class Host:
    """One SSH host: its connections and the machines it runs."""

    def __init__(self, system: Any, host: str, user: Optional[str], port: int,
                 placement: threading.Lock):
        self.system = system  # its connection settings: user, key_files, known_hosts_path, ...
        self.placement = placement  # the system's lock over reserved and procs
        self.host = host
        self.user = user
        self.port = port
        self.label = host if port == 22 else f"{host}:{port}"
        self.lock = threading.Lock()
        self.clients: list[Any] = []  # paramiko.SSHClient, the first for short execs
        self.sessions: dict[int, int] = {}  # id(client) -> machine sessions open on it
        self.reserved = 0  # machines placed here and not yet spawned
        self.procs: list[Any] = []  # machines spawned here and not yet stopped

    def load(self) -> int:
        """Machines running or starting here (call with the placement lock held)."""
        return self.reserved + sum(1 for p in self.procs if p.alive())

    def forget(self, proc: Any) -> None:
        """proc has stopped: it no longer counts here."""
        with self.placement:
            if proc in self.procs:
                self.procs.remove(proc)

    # -- connecting

    def client(self, deadline: float) -> Any:
        with self.lock:
            for c in self.clients:
                transport = c.get_transport()
                if transport is not None and transport.is_active():
                    return c
            self.clients = []
            self.sessions = {}
        c = self._connect(deadline)
        with self.lock:
            self.clients.append(c)
            self.sessions[id(c)] = 0
        return c

    def machine_client(self, deadline: float) -> Any:
        """A connection with a free session slot for one more machine; reserves it."""
        self.client(deadline)
        with self.lock:
            for c in self.clients:
                transport = c.get_transport()
                if (transport is not None and transport.is_active()
                        and self.sessions.get(id(c), 0) < MACHINES_PER_CONNECTION):
                    self.sessions[id(c)] = self.sessions.get(id(c), 0) + 1
                    return c
        c = self._connect(deadline)
        with self.lock:
            self.clients.append(c)
            self.sessions[id(c)] = 1
        return c

    def release_session(self, c: Any) -> None:
        with self.lock:
            if id(c) in self.sessions:
                self.sessions[id(c)] = max(0, self.sessions[id(c)] - 1)

    def _connect(self, deadline: float) -> Any:
        paramiko = load_paramiko()
        system = self.system
        timeout = max(0.5, min(system.connect_timeout, deadline - time.monotonic()))
        client = paramiko.SSHClient()
        known = system.known_hosts_path
        if os.path.exists(known):
            try:
                client.load_host_keys(known)
            except (OSError, paramiko.SSHException) as exc:
                raise AuthError(self.label, f"cannot read known_hosts {known}: {exc}") from exc
        client.set_missing_host_key_policy(HostKeyPolicy(known, system.accept_new_hosts, self.label, self.host, self.port))
        for path in system.key_files:
            if not os.path.isfile(path):
                raise AuthError(self.label, f"the key file {path} does not exist")
        user = self.user or system.user or getpass.getuser()
        try:
            client.connect(
                self.host, port=self.port, username=user,
                key_filename=system.key_files or None, allow_agent=system.agent,
                look_for_keys=not system.key_files,
                timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                channel_timeout=timeout)
        except AuthError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise changed_key_error(self.label, self.host, self.port, known, exc) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            tried = []
            if system.key_files:
                tried.append(f"key file {', '.join(system.key_files)}")
            if system.agent:
                tried.append("the ssh agent" + ("" if os.environ.get("SSH_AUTH_SOCK")
                                                else " (none: SSH_AUTH_SOCK is not set)"))
            if not system.key_files:
                tried.append("~/.ssh/id_*")
            raise AuthError(self.label, f"user {user!r} was refused ({exc}); tried "
                                        + ", ".join(tried)) from None
        except (socket.timeout, TimeoutError) as exc:
            client.close()
            raise Error(f"cannot reach SSH host {self.label}: no answer within "
                        f"{timeout:.3g} s") from exc
        except paramiko.SSHException as exc:
            transport = client.get_transport()
            cause = transport.get_exception() if transport is not None else None
            banner = getattr(transport, "remote_version", "") if transport is not None else ""
            client.close()
            text = str(cause or exc)
            if "banner" in text.lower() or not banner:
                text = f"it did not speak SSH within {timeout:.3g} s ({text})"
            raise Error(f"cannot open an SSH session to {self.label}: {text}") from exc
        except OSError as exc:
            client.close()
            raise Error(f"cannot reach SSH host {self.label}: {exc}") from exc
        transport = client.get_transport()
        transport.set_keepalive(10)
        return client

    def close(self) -> None:
        with self.lock:
            clients, self.clients, self.sessions = self.clients, [], {}
        for c in clients:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken transport
                pass

    # -- running commands

    def run_argv(self, argv: Sequence[str], stdin: bytes, deadline: float
                 ) -> tuple[int, bytes, bytes]:
        """run() for an argv, each word quoted for the remote shell (a _remote.Run)."""
        return self.run(join(argv), deadline, stdin=stdin)

    def run(self, command: str, deadline: float, stdin: bytes = b"",
            client: Any = None) -> tuple[int, bytes, bytes]:
        """Run command on the host; return (exit status, stdout, stderr) by deadline."""
        client = client or self.client(deadline)
        chan = open_session(client, self.label, deadline)
        try:
            chan.settimeout(max(0.1, deadline - time.monotonic()))
            exec_command(chan, command, self.label, deadline)
            if stdin:
                view = memoryview(stdin)
                for i in range(0, len(view), 1 << 16):
                    chan.sendall(view[i:i + (1 << 16)])
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            fd = chan.fileno()
            while True:
                if chan.recv_ready():
                    out += chan.recv(1 << 16)
                    continue
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 16)
                    continue
                if chan.eof_received and chan.status_event.is_set():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Error(f"{self.label}: a command did not finish in time: "
                                f"{short(command)}")
                select.select([fd], [], [], min(left, 0.2))
            return chan.recv_exit_status(), bytes(out), bytes(err)
        except socket.timeout:
            raise Error(f"{self.label}: a command did not finish in time: {short(command)}") \
                from None
        finally:
            chan.close()


def open_session(client: Any, label: str, deadline: float) -> Any:
    paramiko = load_paramiko()
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise Error(f"the SSH connection to {label} is closed")
    for attempt in range(20):
        try:
            return transport.open_session(timeout=max(0.5, deadline - time.monotonic()))
        except paramiko.ChannelException as exc:
            # sshd's MaxSessions: a short exec may wait for another one to end
            if time.monotonic() + 0.1 > deadline or attempt == 19:
                raise Error(f"{label} refused another SSH session: {exc}") from exc
            time.sleep(0.1)
        except paramiko.SSHException as exc:
            raise Error(f"cannot open an SSH session on {label}: {exc}") from exc
    raise AssertionError("unreachable")


def exec_command(chan: Any, command: str, label: str, deadline: float) -> None:
    """chan.exec_command by deadline: paramiko waits for the host's answer without
    a timeout, so a host that stalls after the channel opened would hang us. It
    waits on a thread of its own; at the deadline the channel is closed and Error
    raised (that thread ends when the connection does)."""
    failed: list = []
    done = threading.Event()

    def start() -> None:
        try:
            chan.exec_command(command)
        except BaseException as exc:  # given to the caller below
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=start, daemon=True, name=f"bigmachine-ssh-exec-{label}").start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        chan.close()
        raise Error(f"{label} did not start a command in time: {short(command)}")
    if failed:
        raise failed[0]


def short(command: str) -> str:
    return command if len(command) < 80 else command[:77] + "..."
