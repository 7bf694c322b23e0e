"""SSH: machines are processes on hosts the driver reaches with SSH (paramiko).

For each host the driver opens one SSH connection (more when a host runs
many machines: sshd allows 10 sessions per connection by default), checks
the host key against an OpenSSH known_hosts file, and probes the remote
Python: its version, platform tag (EXT_SUFFIX), numpy and cloudpickle, and
which code bundles the host already holds. It then ships what is missing:

- the bigmachine package: its .py and .pyx sources, plus the driver's own
  compiled extensions when the host's EXT_SUFFIX is the driver's. On the
  host, the unpack step imports the package; when the extensions are absent
  or do not load (another platform, an older C library) it builds them there
  with Cython, or fails saying what to install.
- the user's code: the driver's working directory and its sys.path entries
  that are not part of an installation (stdlib, site-packages), each walked
  for files matching `include` (default ``*.py``) less `exclude`.

Each bundle is a gzipped tar stored under ``<cache_dir>/bundles/<sha256 of
its contents>``, unpacked into a staging dir and renamed into place, so a
later start (from this driver or another) uploads nothing the host already
has; `uploads` counts what was sent.

Each machine is ``python -m bigmachine._worker`` started through an exec
channel (the account's login shell must be a POSIX shell), in its own run dir
``<cache_dir>/run/<launch>/<name>`` (its cwd and TMPDIR). Its bootstrap
(config line, the cluster credentials, and with TLS its own key and
certificate) goes over the channel's stdin, never argv or the environment;
stdin then stays open and the machine exits when it closes, that is when the
SSH session ends; without keepalives it also stops when its lease runs out.
The machine listens on the address the host was reached at (from sshd's
SSH_CONNECTION; `bind` overrides it) and reports that address as its first
stdout line; the driver connects to it directly, or with `tunnel` through a
local forwarding listener. Its output reaches the driver's stderr line by
line, prefixed with host and machine name. Stopping a machine removes its run
dir; the bundle cache stays (nothing prunes it yet).
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import select
import shlex
import socket
import sys
import sysconfig
import threading
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

from .._auth import Credentials
from .._bundle import DEFAULT_EXCLUDE, Bundle, bigmachine_bundle, user_bundle, user_paths
from ..errors import AuthError, Error
from . import Process, System, bootstrap, forward_output

log = logging.getLogger("bigmachine.ssh")

STATUS_PREFIX = "bigmachine-status listening "  # must match _worker.STATUS_PREFIX
PID_PREFIX = "bigmachine-status pid "
MIN_PYTHON = (3, 9)
REQUIRED = ("numpy", "cloudpickle")
MACHINES_PER_CONNECTION = 8  # sshd's MaxSessions defaults to 10; leave room for short execs

# The probe runs on the host under whatever `python` names; it must parse on
# any Python, even 2.7, so that a wrong version is reported, not a SyntaxError.
_PROBE = r'''
import json, os, platform, sys
out = {"version": list(sys.version_info[:3]), "executable": sys.executable,
       "machine": platform.machine(), "system": platform.system(),
       "ssh_connection": os.environ.get("SSH_CONNECTION", ""),
       "path": [p for p in sys.path if p], "packages": {}}
try:
    import sysconfig
    out["ext_suffix"] = sysconfig.get_config_var("EXT_SUFFIX") or ""
except Exception:
    out["ext_suffix"] = ""
def version(name):
    try:
        import importlib.util
        if importlib.util.find_spec(name) is None:
            return None
    except Exception:
        return None
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:
        return "unknown"
for name in sys.argv[2:]:
    out["packages"][name] = version(name)
cache = os.path.abspath(os.path.expanduser(sys.argv[1]))
out["cache"] = cache
try:
    out["bundles"] = sorted(os.listdir(os.path.join(cache, "bundles")))
except OSError:
    out["bundles"] = []
sys.stdout.write(json.dumps(out) + "\n")
'''

# Unpacks one bundle (a tar.gz on stdin) into <cache>/bundles/<name>. For the
# bigmachine bundle it then imports the package, and builds the extensions with
# Cython when they are missing or do not load.
_UNPACK = r'''
import io, os, shutil, subprocess, sys, tarfile, tempfile
cache, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
exts = sys.argv[4:]
bundles = os.path.join(cache, "bundles")
final = os.path.join(bundles, name)
data = sys.stdin.buffer.read()
if os.path.isdir(final):
    sys.exit(0)
os.makedirs(bundles, exist_ok=True)
tag = os.path.join(cache, "CACHEDIR.TAG")
if not os.path.exists(tag):
    with open(tag, "w") as f:
        f.write("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# bigmachine's code bundles; see https://bford.info/cachedir/\n")
stage = tempfile.mkdtemp(prefix=".stage-", dir=bundles)
CHECK = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
BUILD = ("import os, sys\nfrom setuptools import Extension, setup\nfrom Cython.Build import cythonize\n"
         "setup(script_args=['build_ext', '--inplace', '--parallel', str(os.cpu_count() or 1)], "
         "ext_modules=cythonize("
         "[Extension(n, [n.replace('.', '/') + '.pyx'], extra_compile_args=['-O2']) "
         "for n in sys.argv[1:]], compiler_directives={'language_level': '3'}, quiet=True))")
def run(code, args):
    env = dict(os.environ, PYTHONPATH=stage, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", code] + args, cwd=stage, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                sys.exit("bigmachine: refusing bundle member %r" % m.name)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(stage, filter="data")
        else:
            tar.extractall(stage)
    if mode != "plain":
        check = run(CHECK, exts) if mode == "check" else None
        if check is None or check.returncode != 0:
            if check is not None:
                sys.stderr.write("bigmachine: the driver's compiled extensions do not load here; "
                                 "building them with Cython\n")
            built = run(BUILD, exts)
            if built.returncode != 0:
                tail = built.stdout.decode("utf-8", "replace").strip().splitlines()[-15:]
                sys.stderr.write("bigmachine: cannot build bigmachine's Cython extensions with %s "
                                 "(it needs Cython, setuptools and a C compiler):\n%s\n"
                                 % (sys.executable, "\n".join(tail)))
                sys.exit(3)
            shutil.rmtree(os.path.join(stage, "build"), ignore_errors=True)
            check = run(CHECK, exts)
            if check.returncode != 0:
                tail = check.stdout.decode("utf-8", "replace").strip().splitlines()[-15:]
                sys.stderr.write("bigmachine: the extensions built here do not load:\n%s\n"
                                 % "\n".join(tail))
                sys.exit(3)
    os.chmod(stage, 0o755)
    try:
        os.rename(stage, final)
    except OSError:
        if not os.path.isdir(final):  # else another driver won the race with the same content
            raise
finally:
    shutil.rmtree(stage, ignore_errors=True)
'''


def _paramiko() -> Any:
    """paramiko, imported on first use: machines import this module without it."""
    try:
        import paramiko
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise Error("bigmachine.SSH needs paramiko: pip install paramiko") from exc
    return paramiko


# ---- hosts and their connections ------------------------------------------------


def _parse_host(spec: str, user: Optional[str], port: int) -> tuple[str, Optional[str], int]:
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


class _Host:
    """One SSH host: its connections, what the probe found, the machines it runs."""

    def __init__(self, system: "SSH", host: str, user: Optional[str], port: int):
        self.system = system
        self.host = host
        self.user = user
        self.port = port
        self.label = host if port == 22 else f"{host}:{port}"
        self.lock = threading.Lock()
        self.clients: list[Any] = []  # paramiko.SSHClient, the first for short execs
        self.sessions: dict[int, int] = {}  # id(client) -> machine sessions open on it
        self.probe: Optional[dict] = None
        self.reserved = 0  # machines placed here and not yet spawned
        self.procs: list["_SSHProcess"] = []  # machines spawned here and not yet stopped

    def load(self) -> int:
        """Machines running or starting here (call with the system's lock held)."""
        return self.reserved + sum(1 for p in self.procs if p.alive())

    # -- connecting

    def client(self, deadline: float) -> Any:
        with self.lock:
            for c in self.clients:
                transport = c.get_transport()
                if transport is not None and transport.is_active():
                    return c
            self.clients = []
            self.sessions = {}
            self.probe = None
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
        paramiko = _paramiko()
        system = self.system
        timeout = max(0.5, min(system.connect_timeout, deadline - time.monotonic()))
        client = paramiko.SSHClient()
        known = system.known_hosts_path
        if os.path.exists(known):
            try:
                client.load_host_keys(known)
            except (OSError, paramiko.SSHException) as exc:
                raise AuthError(self.label, f"cannot read known_hosts {known}: {exc}") from exc
        client.set_missing_host_key_policy(_HostKeyPolicy(system, self, self.label))
        for path in system.key_files:
            if not os.path.isfile(path):
                raise AuthError(self.label, f"the key file {path} does not exist")
        user = self.user or system.user or _local_user()
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
            raise AuthError(
                self.label,
                f"its host key CHANGED: known_hosts {known} has "
                f"{exc.expected_key.get_name()} {exc.expected_key.get_base64()[:24]}... but the "
                f"host offered {exc.key.get_name()} {exc.key.get_base64()[:24]}...; someone may "
                "be intercepting the connection. If the change is expected, remove the old line "
                f"(ssh-keygen -R {shlex.quote(_known_name(self.host, self.port))} -f {known})"
            ) from None
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
            self.probe = None
        for c in clients:
            try:
                c.close()
            except Exception:  # pragma: no cover - closing a broken transport
                pass

    # -- running commands

    def run(self, command: str, deadline: float, stdin: bytes = b"",
            client: Any = None) -> tuple[int, bytes, bytes]:
        """Run command on the host; return (exit status, stdout, stderr) by deadline."""
        client = client or self.client(deadline)
        chan = _open_session(client, self.label, deadline)
        try:
            chan.settimeout(max(0.1, deadline - time.monotonic()))
            chan.exec_command(command)
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
                                f"{_short(command)}")
                select.select([fd], [], [], min(left, 0.2))
            return chan.recv_exit_status(), bytes(out), bytes(err)
        except socket.timeout:
            raise Error(f"{self.label}: a command did not finish in time: {_short(command)}") \
                from None
        finally:
            chan.close()


def _open_session(client: Any, label: str, deadline: float) -> Any:
    paramiko = _paramiko()
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


def _short(command: str) -> str:
    return command if len(command) < 80 else command[:77] + "..."


def _known_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _local_user() -> str:
    import getpass

    return getpass.getuser()


class _HostKeyPolicy:
    """paramiko's missing-host-key hook: refuse, or with accept_new_hosts, record."""

    def __init__(self, system: "SSH", host: _Host, label: str):
        self.system = system
        self.host = host
        self.label = label

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        system = self.system
        known = system.known_hosts_path
        others = client.get_host_keys().lookup(hostname)
        if others:  # a key of another type is known: treat as changed, never accept
            raise AuthError(self.label, f"its host key CHANGED: known_hosts {known} has "
                            f"{', '.join(others.keys())} for {hostname} but the host offered "
                            f"{key.get_name()}; remove the old line if the change is expected")
        fingerprint = _fingerprint(key)
        if not system.accept_new_hosts:
            raise AuthError(self.label, f"its host key ({key.get_name()} {fingerprint}) is not "
                            f"in known_hosts {known}; check the fingerprint and add it (ssh-keyscan "
                            f"-p {self.host.port} {self.host.host} >> {known}), or pass "
                            "accept_new_hosts=True")
        with system._known_lock:
            directory = os.path.dirname(known)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(known, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("SSH host %s: accepted new host key %s %s into %s",
                    self.label, key.get_name(), fingerprint, known)


def _fingerprint(key: Any) -> str:
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# ---- a machine ------------------------------------------------------------------------


class _SSHProcess(Process):
    def __init__(self, host: _Host, client: Any, name: str, run_dir: str, chan: Any):
        self.host = host
        self.client = client
        self.name = name
        self.run_dir = run_dir
        self.chan = chan
        self.addr = ""
        self.remote_addr = ""  # with a tunnel: the machine's own address on the host
        self.forwarder: Optional[_Forwarder] = None
        self.pid: Optional[int] = None
        self.ready = threading.Event()
        self.tail: collections.deque = collections.deque(maxlen=20)
        self._stopped = False
        self._lock = threading.Lock()
        self.prefix = f"{host.label} {name}: "
        self.pumps = [
            threading.Thread(target=self._pump, args=(chan.makefile("rb"), True), daemon=True,
                             name=f"bigmachine-ssh-out-{name}"),
            threading.Thread(target=self._pump, args=(chan.makefile_stderr("rb"), False),
                             daemon=True, name=f"bigmachine-ssh-err-{name}"),
        ]
        for t in self.pumps:
            t.start()

    def _pump(self, pipe: Any, is_stdout: bool) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if is_stdout and not self.ready.is_set():
                    if line.startswith(PID_PREFIX) and line[len(PID_PREFIX):].isdigit():
                        self.pid = int(line[len(PID_PREFIX):])
                        continue
                    if line.startswith(STATUS_PREFIX):
                        self.addr = line[len(STATUS_PREFIX):].strip()
                        self.ready.set()
                        continue
                self.tail.append(line)
                forward_output(self.prefix + line + "\n")
        except (OSError, EOFError, ValueError):
            pass  # the channel went away; alive() and describe_exit() tell the story
        finally:
            if is_stdout:
                self.ready.set()

    def await_addr(self, deadline: float, timeout: float) -> str:
        self.ready.wait(max(0.0, deadline - time.monotonic()))
        if self.addr:
            return self.addr
        if not self.ready.is_set():
            raise self.error(f"did not start within {timeout:g} s", wait=False)
        raise self.error("exited before it was ready")

    def forward(self) -> None:
        """Serve the machine on a local forwarding listener; it becomes our address."""
        self.forwarder = _Forwarder(self.client, self.addr, f"{self.host.label} {self.name}")
        self.remote_addr, self.addr = self.addr, self.forwarder.addr

    def alive(self, wait: float = 0.0) -> bool:
        if wait:
            self.chan.status_event.wait(wait)
        return not self.chan.status_event.is_set()

    def describe_exit(self) -> str:
        if not self.chan.status_event.is_set():
            return "still running"
        code = self.chan.exit_status
        if code == -1:  # sshd sent exit-signal (paramiko ignores it), or the link broke
            transport = self.client.get_transport()
            if transport is not None and transport.is_active():
                return "killed by a signal (sshd reported no exit status)"
            return f"the SSH connection to {self.host.label} broke"
        if code > 128:
            return f"exit status {code} (signal {code - 128}?)"
        return f"exit status {code}"

    def error(self, what: str, wait: bool = True) -> Error:
        """An Error saying what, with the machine's last output lines."""
        if wait:  # it has ended: let its exit status and last lines arrive
            self.chan.status_event.wait(1.0)
            for t in self.pumps:
                t.join(1)
        lines = "\n".join(f"  {line}" for line in self.tail)
        return Error(f"machine {self.name} on {self.host.label} {what} ({self.describe_exit()})"
                     + (f"; its last output:\n{lines}" if lines else ""))

    def stop(self, timeout: float, grace: float = 2.0) -> None:
        """Wait up to timeout for the machine to end; then close its stdin, and
        after grace seconds more SIGKILL its process group. Remove its run dir,
        unless the host could not be reached to kill it (a cut link: the
        machine then stops by its lease; its run dir stays)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        reached = True
        if not self.chan.status_event.wait(timeout):
            self.chan.shutdown_write()  # stdin EOF: the machine stops itself at once
            if not self.chan.status_event.wait(grace):
                reached = self.kill()
                if reached:
                    self.chan.status_event.wait(2.0)
        self.chan.close()
        if self.forwarder is not None:
            self.forwarder.close()
        self.host.release_session(self.client)
        for t in self.pumps:
            t.join(2)
        if reached:
            self._cleanup()
        else:  # another command over the same dead link would only wait out its deadline
            log.warning("left the run dir %s on %s: the host did not answer", self.run_dir,
                        self.host.label)
            with self.host.system._lock:
                if self in self.host.procs:
                    self.host.procs.remove(self)

    def kill(self) -> bool:
        """SIGKILL the machine's process group on the host; False if that failed."""
        if self.pid is None:
            self.chan.close()  # sshd then closes the machine's stdin
            return True
        try:
            self.host.run(f"kill -KILL -- -{self.pid} 2>/dev/null; true",
                          time.monotonic() + 5.0, client=self.client)
        except Error as exc:
            log.warning("cannot kill machine %s on %s: %s", self.name, self.host.label, exc)
            return False
        return True

    def _cleanup(self) -> None:
        parent = os.path.dirname(self.run_dir)
        transport = self.client.get_transport()
        alive = transport is not None and transport.is_active()
        try:  # on a new connection if the machine's own is gone
            self.host.run(f"rm -rf {shlex.quote(self.run_dir)}; "
                          f"rmdir {shlex.quote(parent)} 2>/dev/null; true",
                          time.monotonic() + 10.0, client=self.client if alive else None)
        except Error as exc:
            log.warning("cannot remove %s on %s: %s", self.run_dir, self.host.label, exc)
        with self.host.system._lock:
            if self in self.host.procs:
                self.host.procs.remove(self)


class _Forwarder:
    """A listener on the driver's 127.0.0.1 whose connections are forwarded to
    target ("host:port" as seen from the SSH host) through the SSH connection."""

    def __init__(self, client: Any, target: str, label: str):
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.client = client
        self.label = label
        self.closed = False
        self.lock = threading.Lock()
        self.open: list[Any] = []  # sockets and channels to close with us
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True,
                         name=f"bigmachine-ssh-forward-{label}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(conn, peer), daemon=True,
                             name=f"bigmachine-ssh-forward-{self.label}").start()

    def _connect(self, conn: socket.socket, peer: tuple) -> None:
        transport = self.client.get_transport()
        try:
            if transport is None or not transport.is_active():
                raise Error("the SSH connection is closed")
            chan = transport.open_channel("direct-tcpip", self.target, peer[:2], timeout=10)
        except Exception as exc:  # paramiko's ChannelException, SSHException, OSError
            log.warning("%s: cannot forward a connection to %s:%d: %s", self.label,
                        *self.target, exc)
            conn.close()
            return
        with self.lock:
            if self.closed:
                conn.close()
                chan.close()
                return
            self.open += [conn, chan]
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def done() -> None:
            _shutdown(conn)
            chan.close()

        threading.Thread(target=_copy, args=(conn.recv, chan.sendall, done), daemon=True,
                         name=f"bigmachine-ssh-forward-{self.label}").start()
        _copy(chan.recv, conn.sendall, done)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            items, self.open = self.open, []
        _shutdown(self.sock)
        for item in items:
            if isinstance(item, socket.socket):
                _shutdown(item)
            else:
                item.close()


def _copy(recv: Any, sendall: Any, done: Any) -> None:
    try:
        while True:
            data = recv(1 << 16)
            if not data:
                break
            sendall(data)
    except Exception:  # OSError, EOFError, paramiko.SSHException: the link is gone
        pass
    finally:
        done()


def _shutdown(sock: socket.socket) -> None:
    """Wake whoever is blocked on sock, then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ---- the system -----------------------------------------------------------------------------


class SSH(System):
    """Machines as processes on SSH hosts (paramiko).

    hosts: "host", "user@host", "host:port" or "user@[v6addr]:port" strings.
    user, port: defaults for hosts that do not say (user: the local user).
    key_filename: a private key file (or a list of them); None tries ~/.ssh/id_*.
    agent: also offer the keys of the ssh agent at SSH_AUTH_SOCK.
    known_hosts: an OpenSSH known_hosts file (default ~/.ssh/known_hosts);
        entries for non-22 ports are looked up as ``[host]:port``, hashed
        entries are understood. A host whose key is not there is refused
        unless accept_new_hosts, which appends it; a host whose key differs
        from the recorded one is always refused (bigmachine.AuthError).
    python: the command that runs Python on the hosts (a shell word; it must
        be the driver's major.minor version, with numpy and cloudpickle).
    machines_per_host: how many machines each host runs at once; machines
        are placed round-robin, on the host running the fewest.
    cache_dir: where hosts keep bundles and run dirs (default ~/.cache/bigmachine).
    user_paths: the directories of user code to ship; None means the driver's
        cwd and its sys.path entries outside any installation.
    include, exclude: glob patterns (matched on file/dir names and on paths
        relative to each user path) of the user files to ship.
    build: "auto" ships the driver's compiled extensions when the host's
        platform tag matches (building them there with Cython if they do not
        load); "always" builds them on the host.
    bind: the address machines listen on (default: the address the host was
        reached at, from sshd's SSH_CONNECTION).
    connect_timeout: seconds for TCP connect, SSH banner and authentication.
    tls: (default True) every connection of the cluster is TLS 1.3 with
        certificates of the per-cluster CA; each machine's key and certificate
        travel over its SSH channel's stdin, like the cluster secret.
    tunnel: reach the machines through the SSH connection (paramiko
        direct-tcpip) instead of directly, for hosts whose ports the driver
        cannot reach: machines then listen on the host's 127.0.0.1 (unless
        bind says otherwise) and each gets a forwarding listener on the
        driver's 127.0.0.1, which becomes its address. The price: bulk data
        goes through paramiko's pure-Python SSH, and machines cannot call each
        other by handle (a handle carries the driver's forwarding address).

    uploads lists (host, bundle label, hash, bytes) for every bundle sent.
    Defaults suit networks: lost_after 15 s, lease 30 s, and socket buffers
    left to the kernel's autotuning (socket_buffer=0).
    """

    name = "ssh"
    lost_after = 15.0
    lease = 30.0
    socket_buffer = 0  # autotuned: real networks have a larger bandwidth-delay product
    start_timeout = 120.0

    def __init__(self, hosts: Iterable[str], user: Optional[str] = None, port: int = 22,
                 key_filename: Any = None, known_hosts: Optional[str] = None,
                 accept_new_hosts: bool = False, python: str = "python3",
                 machines_per_host: int = 1, tls: bool = True, tunnel: bool = False,
                 agent: bool = True, cache_dir: str = "~/.cache/bigmachine",
                 user_paths: Optional[Sequence[str]] = None,
                 include: Sequence[str] = ("*.py",), exclude: Sequence[str] = (),
                 build: str = "auto", bind: Optional[str] = None,
                 connect_timeout: float = 10.0, **options: Any):
        if isinstance(hosts, str):
            hosts = [hosts]
        specs = [_parse_host(h, user, port) for h in hosts]
        if not specs:
            raise Error("SSH needs at least one host")
        if not isinstance(machines_per_host, int) or machines_per_host < 1:
            raise Error(f"machines_per_host must be a positive int, not {machines_per_host!r}")
        if build not in ("auto", "always"):
            raise Error(f"build must be 'auto' or 'always', not {build!r}")
        self.user = user
        self.port = port
        self.key_filename = key_filename
        files = [key_filename] if isinstance(key_filename, (str, os.PathLike)) else key_filename
        self.key_files = [os.path.expanduser(os.fspath(f)) for f in files or ()]
        self.known_hosts_path = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self.accept_new_hosts = accept_new_hosts
        self.python = python
        self.machines_per_host = machines_per_host
        self.tunnel = bool(tunnel)
        self.agent = agent
        self.cache_dir = cache_dir
        self.user_paths = None if user_paths is None else [os.path.abspath(p) for p in user_paths]
        self.include = tuple(include)
        self.exclude = tuple(DEFAULT_EXCLUDE) + tuple(exclude)
        self.build = build
        self.bind = bind
        self.connect_timeout = float(connect_timeout)
        self.uploads: list[tuple[str, str, str, int]] = []
        self._hosts = [_Host(self, h, u, p) for h, u, p in specs]
        self._known_lock = threading.Lock()
        self._lock = threading.Lock()
        self.configure(tls=tls, **options)

    def __repr__(self) -> str:
        return f"SSH(hosts={[h.label for h in self._hosts]!r})"

    # ---- launching

    def launch(self, creds: Credentials, names: list[str], timeout: float) -> list[Process]:
        deadline = time.monotonic() + timeout
        placement = self._place(names)
        procs: list[_SSHProcess] = []
        try:
            hosts = list(dict.fromkeys(placement))
            user = self._user_bundles()
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
                futures = [pool.submit(self._prepare, h, user, deadline) for h in hosts]
                plans = {h: f.result() for h, f in zip(hosts, futures)}
            launch_id = uuid.uuid4().hex[:12]
            for name, host in zip(names, placement):
                procs.append(self._spawn(host, plans[host], creds, name, launch_id, deadline))
            for proc in procs:
                proc.addr = proc.await_addr(deadline, timeout)
                if self.tunnel:
                    proc.forward()
        except BaseException:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
                list(pool.map(lambda p: p.stop(0.0, grace=0.5), procs))
            with self._lock:
                for host in placement[len(procs):]:
                    host.reserved -= 1
            raise
        return procs

    def _place(self, names: list[str]) -> list[_Host]:
        """Round-robin: each machine goes to the host running the fewest."""
        with self._lock:
            free = sum(self.machines_per_host - h.load() for h in self._hosts)
            if len(names) > free:
                raise Error(
                    f"cannot start {len(names)} machines: {len(self._hosts)} hosts x "
                    f"machines_per_host={self.machines_per_host} leaves room for {free} more")
            placement = []
            for _ in names:
                host = min(self._hosts, key=lambda h: h.load())  # the first of ties
                host.reserved += 1
                placement.append(host)
            return placement

    def _user_bundles(self) -> list[Bundle]:
        paths = self.user_paths if self.user_paths is not None else user_paths()
        return [user_bundle(p, self.include, self.exclude) for p in paths]

    def _prepare(self, host: _Host, user: list[Bundle], deadline: float) -> dict:
        """Connect, probe, and ship what the host lacks; return the launch plan."""
        host.client(deadline)
        status, out, err = host.run(
            f"{self.python} -c {shlex.quote(_PROBE)} {shlex.quote(self.cache_dir)} "
            + " ".join(REQUIRED), deadline)
        probe = self._check_probe(host, status, out, err)
        ours = sysconfig.get_config_var("EXT_SUFFIX") or ""
        binaries = self.build == "auto" and probe["ext_suffix"] == ours
        bm, exts = bigmachine_bundle(probe["ext_suffix"], binaries)
        present = set(probe["bundles"])
        cache = probe["cache"]
        mode = "check" if binaries else "build"
        for bundle, how in [(bm, mode)] + [(b, "plain") for b in user]:
            if bundle.hash in present:
                continue
            data = bundle.tar()
            status, out, err = host.run(
                f"{self.python} -c {shlex.quote(_UNPACK)} {shlex.quote(cache)} {bundle.hash} "
                f"{how} " + " ".join(exts if how != "plain" else []), deadline, stdin=data)
            if status != 0:
                text = (out + err).decode("utf-8", "replace").strip()
                raise Error(f"cannot install {bundle.label} on {host.label} "
                            f"(status {status}):\n{_indent(text)}")
            present.add(bundle.hash)
            with self._lock:
                self.uploads.append((host.label, bundle.label, bundle.hash, len(data)))
            log.info("shipped %s to %s (%d bytes)", bundle.label, host.label, len(data))
        bundles = os.path.join(cache, "bundles")
        sys_path = ([os.path.join(bundles, bm.hash)]
                    + [os.path.join(bundles, b.hash) for b in user]
                    + [p for p in probe["path"] if p != os.path.join(bundles, bm.hash)])
        return {"cache": cache, "bigmachine": os.path.join(bundles, bm.hash),
                "sys_path": sys_path, "bind": self._bind_address(host, probe)}

    def _check_probe(self, host: _Host, status: int, out: bytes, err: bytes) -> dict:
        text = err.decode("utf-8", "replace").strip()
        if status == 127:
            raise Error(f"no Python on {host.label}: `{self.python}` was not found"
                        + (f" ({text.splitlines()[-1]})" if text else "")
                        + "; pass SSH(python=...) naming an interpreter there")
        try:
            probe = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError, UnicodeDecodeError):
            probe = None
        if status != 0 or not isinstance(probe, dict):
            raise Error(f"cannot run `{self.python}` on {host.label} (status {status})"
                        + (f":\n{_indent(text)}" if text else ""))
        version = tuple(probe["version"][:2])
        ours = sys.version_info[:2]
        shown = ".".join(map(str, probe["version"]))
        if version < MIN_PYTHON:
            raise Error(f"{host.label} has Python {shown} at `{self.python}`, too old: bigmachine "
                        f"needs Python >= {'.'.join(map(str, MIN_PYTHON))}, and the same "
                        f"major.minor as the driver ({ours[0]}.{ours[1]})")
        if version != ours:
            raise Error(f"{host.label} has Python {shown} at `{self.python}`; the driver runs "
                        f"{ours[0]}.{ours[1]}: machines must run the same major.minor version "
                        "(pickles and the protocol depend on it); pass SSH(python=...)")
        missing = [name for name in REQUIRED if not probe["packages"].get(name)]
        if missing:
            raise Error(f"{host.label}: {probe['executable']} lacks {', '.join(missing)}; "
                        f"install {'them' if len(missing) > 1 else 'it'} there "
                        f"(pip install {' '.join(missing)})")
        import cloudpickle

        theirs = probe["packages"].get("cloudpickle")
        if theirs not in (cloudpickle.__version__, "unknown"):
            log.warning("%s has cloudpickle %s, the driver %s: functions and classes pickled "
                        "by value may not load there", host.label, theirs, cloudpickle.__version__)
        host.probe = probe
        return probe

    def _bind_address(self, host: _Host, probe: dict) -> str:
        if self.bind:
            return self.bind
        if self.tunnel:
            return "127.0.0.1"
        fields = probe.get("ssh_connection", "").split()
        if len(fields) >= 3:
            addr = fields[2]
            if addr.lower().startswith("::ffff:") and addr.count(".") == 3:
                addr = addr[7:]  # an IPv4 client of a dual-stack sshd
            return addr
        raise Error(f"cannot tell which address of {host.label} to listen on (no "
                    "SSH_CONNECTION); pass SSH(bind=...)")

    def _spawn(self, host: _Host, plan: dict, creds: Credentials, name: str,
               launch_id: str, deadline: float) -> _SSHProcess:
        client = host.machine_client(deadline)
        try:
            run_dir = os.path.join(plan["cache"], "run", launch_id, name)
            q = shlex.quote
            command = (
                f"mkdir -p {q(run_dir + '/tmp')} && cd {q(run_dir)} && "
                f"echo {PID_PREFIX}$$ && "
                f"TMPDIR={q(run_dir + '/tmp')} PYTHONPATH={q(plan['bigmachine'])} "
                f"PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 "
                f"exec {self.python} -m bigmachine._worker")
            chan = _open_session(client, host.label, deadline)
        except BaseException:
            host.release_session(client)
            raise
        bind = plan["bind"]
        config = {
            "sys_path": plan["sys_path"],
            "cwd": run_dir,
            "lease": self.lease,
            "socket_buffer": self.socket_buffer,
            "parent_pipe": True,
            "listen": f"[{bind}]:0" if ":" in bind else f"{bind}:0",
        }
        data = bootstrap(creds, name, config, (bind,))
        chan.settimeout(None)
        chan.exec_command(command)
        proc = _SSHProcess(host, client, name, run_dir, chan)
        proc.cert_hosts = (bind,)
        try:
            chan.sendall(data)
        except BaseException:
            proc.stop(0.0, grace=0.5)
            raise
        with self._lock:
            host.reserved -= 1
            host.procs.append(proc)
        return proc

    def shutdown(self) -> None:
        for host in self._hosts:
            host.close()


def _indent(text: str, limit: int = 20) -> str:
    lines = text.splitlines()[-limit:]
    return "\n".join(f"  {line}" for line in lines)
