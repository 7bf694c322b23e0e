"""Local: each machine is a child process of the driver on this host.

The child runs the driver's interpreter with its sys.path and working
directory. Its bootstrap (config, then the cluster credentials and its owner
token) arrives on stdin, never argv or the environment; stdin then stays
open, and the machine exits at once when it closes, that is when the driver
is gone. The child listens on a Unix socket in the session's private
directory (or, with tls=True, on a loopback TCP port it binds itself) and
reports its address on a status pipe. Its stdout and stderr are copied, line by line,
to the driver's stderr prefixed with the machine's name.
"""
from __future__ import annotations

import collections
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from typing import Optional

from .._auth import Credentials
from ..errors import Error
from . import Process, SocketDir, System, bootstrap, forward_output

# The directory holding the bigmachine package, for the machine's PYTHONPATH.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _LocalProcess(Process):
    def __init__(self, name: str, popen: subprocess.Popen):
        self.name = name
        self.popen = popen
        self.addr = ""
        self.tail: collections.deque = collections.deque(maxlen=20)
        self.pumps = [
            threading.Thread(target=self._pump, args=(popen.stdout,), daemon=True,
                             name=f"bigmachine-out-{name}"),
            threading.Thread(target=self._pump, args=(popen.stderr,), daemon=True,
                             name=f"bigmachine-err-{name}"),
        ]
        for t in self.pumps:
            t.start()
        threading.Thread(target=self._reap_group, daemon=True, name=f"bigmachine-reap-{name}").start()

    def _reap_group(self) -> None:
        """When the machine ends, however it ends, kill what is left in its process group.

        A machine kills its group itself when it exits, but not when it is
        SIGKILLed; then its children (which may hold its sockets open) would
        live on. We wait without reaping, so that the group id cannot be reused
        before we signal it.
        """
        try:
            os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # already reaped by Popen; its group id is still held by any member left
        except OSError:
            return
        self.kill()

    def _pump(self, pipe: Any) -> None:
        prefix = f"{self.name}: "
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            forward_output(prefix + (line if line.endswith("\n") else line + "\n"))
        pipe.close()

    def alive(self, wait: float = 0.0) -> bool:
        try:
            self.popen.wait(wait) if wait else None
        except subprocess.TimeoutExpired:
            pass
        return self.popen.poll() is None

    def local_pid(self) -> int:
        return self.popen.pid

    def describe_exit(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def stop(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait(5)
        self._close_stdin()
        for t in self.pumps:
            t.join(2)

    def kill(self) -> None:
        """SIGKILL the machine and everything in its process group."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_stdin(self) -> None:
        try:
            self.popen.stdin.close()
        except (OSError, ValueError):
            pass

    def error(self, what: str) -> Error:
        for t in self.pumps:
            t.join(1)
        lines = "\n".join(f"  {line}" for line in self.tail)
        return Error(f"machine {self.name} {what} ({self.describe_exit()})"
                     + (f"; its last output:\n{lines}" if lines else ""))


class Local(System):
    """Machines as child processes on this host, linked by Unix sockets.

    The sockets live in a private (0700) directory and every connection is
    checked to come from a process of our own user before the handshake.
    parent_pipe: machines exit as soon as the driver's process is gone (they
    see their stdin close); False leaves only the keepalive lease (for tests).
    tls: off by default here, since the traffic never leaves the host; True
    links the machines by TLS over loopback TCP instead (as remote ones are).
    """

    name = "local"

    def __init__(self, parent_pipe: bool = True, **options: Any):
        self.parent_pipe = parent_pipe
        self.sockets: Optional[SocketDir] = None
        self.configure(**options)

    @property
    def tcp(self) -> bool:
        return self.tls

    def _listen_addr(self, name: str) -> str:
        if self.tcp:
            return "127.0.0.1:0"
        if self.sockets is None:
            self.sockets = SocketDir()
        return self.sockets.addr(name)

    def shutdown(self) -> None:
        if self.sockets is not None:
            self.sockets.remove()

    def launch(self, creds: Credentials, names: list[str], timeout: float) -> list[Process]:
        procs: list[_LocalProcess] = []
        try:
            for name in names:
                procs.append(self._spawn(creds, name))
            for proc in procs:
                proc.addr = self._await_addr(proc, timeout)
        except BaseException:
            for proc in procs:
                if proc.status_fd is not None:  # type: ignore[attr-defined]
                    os.close(proc.status_fd)  # type: ignore[attr-defined]
                proc.kill()
                proc.stop(1)
            raise
        return procs

    def _spawn(self, creds: Credentials, name: str) -> _LocalProcess:
        status_r, status_w = os.pipe()
        config = {
            "sys_path": [p if p else os.getcwd() for p in sys.path],
            "cwd": os.getcwd(),
            "lease": self.lease,
            "socket_buffer": self.socket_buffer,
            "status_fd": status_w,
            "parent_pipe": self.parent_pipe,
            "listen": self._listen_addr(name),
        }
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # machine output reaches the driver as it is printed
        env["PYTHONPATH"] = os.pathsep.join(
            [_PACKAGE_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "bigmachine._worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=os.getcwd(), env=env, pass_fds=(status_w,), start_new_session=True)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        try:
            popen.stdin.write(bootstrap(creds, name, config, ("127.0.0.1",)))
            popen.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once; _await_addr reports how, with its output
        proc = _LocalProcess(name, popen)
        proc.status_fd = status_r  # type: ignore[attr-defined]
        return proc

    def _await_addr(self, proc: _LocalProcess, timeout: float) -> str:
        fd = proc.status_fd  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise proc.error(f"did not start within {timeout:g} s")
                chunk = os.read(fd, 256)
                if not chunk:
                    raise proc.error("exited before it was ready")
                data += chunk
                if len(data) > 256:
                    raise proc.error("reported a malformed address")
        finally:
            proc.status_fd = None  # type: ignore[attr-defined]
            os.close(fd)
        return data.decode().strip()
