"""Local: each machine is a child process of the driver on this host.

The child runs the driver's interpreter with its sys.path and working
directory: forked from the session's template (_template.py), which has
already imported what a machine runs, or, when the machine's environment
changes what an interpreter reads at start-up (or no template can run), a
fresh ``python -m bigmachine._worker``. Either way it is the driver's child,
in a process group of its own. Its bootstrap (config, then the cluster credentials and its owner
token) arrives on stdin, never argv or the environment; stdin then stays
open, and the machine exits at once when it closes, that is when the driver
is gone. The child listens on a Unix socket in the session's private
directory (or, with tls=True, on a loopback TCP port it binds itself) and
reports its address on a status pipe (the status line of _bootstrap). Its stdout and stderr are copied, line by line,
to the driver's stderr prefixed with the machine's name.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Optional, Union

from .._auth import Credentials
from ..errors import Error
from . import Process, SocketDir, System
from ._bootstrap import Output, Spawned, bootstrap
from ._template import (BATCH, STATUS_FD, Child, Template, TemplateError, startup_vars,
                        supported)

if TYPE_CHECKING:
    from ._packages import PackagesArg

log = logging.getLogger("bigmachine")

# Seconds stop() waits for a machine to end after SIGKILL: one in uninterruptible
# sleep (a hung disk or network filesystem), or freeing a very large memory, takes
# longer; it is then left to be reaped when it ends.
KILL_WAIT = 5.0
# Seconds a start waits for the template to fork (at most half the start timeout):
# a template that does not answer by then is dropped, and the machines start fresh.
FORK_WAIT = 10.0

# The directory holding the bigmachine package, for the machine's PYTHONPATH.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _LocalProcess(Spawned):
    def __init__(self, name: str, popen: Union[subprocess.Popen, Child], status: IO[bytes]):
        self.name = name
        self.popen = popen
        self.addr = ""
        self.output = Output(name, f"{name}: ")
        self.output.pump(popen.stdout, f"bigmachine-out-{name}")
        self.output.pump(popen.stderr, f"bigmachine-err-{name}")
        self.output.pump(status, f"bigmachine-status-{name}", status=True)
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
            try:
                self.popen.wait(KILL_WAIT)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) has not ended %.3g s after SIGKILL; stopping goes on",
                            self.name, self.popen.pid, KILL_WAIT)
        self._close_stdin()
        self.output.join(2)

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


class Local(System):
    """Machines as child processes on this host, linked by Unix sockets.

    The sockets live in a private (0700) directory and every connection is
    checked to come from a process of our own user before the handshake.
    parent_pipe: machines exit as soon as the driver's process is gone (they
    see their stdin close); False leaves only the keepalive lease (for tests).
    packages, requirements: what the machines need, checked against the
        driver's environment (which they share): a missing one is an Error here.
    tls: off by default here, since the traffic never leaves the host; True
    links the machines by TLS over loopback TCP instead (as remote ones are).
    shared_memory: on by default here (large arrays as shared memory between
    the driver and the machines); False sends every byte through the sockets.
    """

    name = "local"
    shared_memory = True

    def __init__(self, parent_pipe: bool = True, packages: PackagesArg = None,
                 requirements: Optional[str] = None, **options: Any):
        if packages is not None or requirements is not None:
            # Imported here: only a session that names packages needs it (importlib.metadata,
            # tarfile for the remote systems' bundles).
            from ._packages import Packages
            Packages(packages, requirements).check_local()
        self.parent_pipe = parent_pipe
        self.sockets: Optional[SocketDir] = None
        self._template: Optional[Template] = None
        self._template_lock = threading.Lock()
        self._down = False  # shut down, until the next session's init
        self.configure(**options)

    @property
    def tcp(self) -> bool:
        return self.tls

    def _listen_addr(self, name: str) -> str:
        if self.tcp:
            return "127.0.0.1:0"
        self._check_up()
        if self.sockets is None:
            self.sockets = SocketDir()
        return self.sockets.addr(name)

    def _check_up(self) -> None:
        """Refuse to make a template or sockets for a session that has shut down (a
        launch it overtook): nothing would ever remove them."""
        if self._down:
            raise Error("the session has shut down: no machine starts")

    def init(self) -> None:
        """Start the session's template now, so that it warms up while the driver does,
        and make the sockets' directory meanwhile (0.5 ms less on the first start's path)."""
        self._down = False
        self._template_for(_machine_env({}))
        if not self.tcp and self.sockets is None:
            self.sockets = SocketDir()

    def shutdown(self) -> None:
        with self._template_lock:
            self._down = True
            if self._template is not None:
                self._template.close()
                self._template = None
        if self.sockets is not None:
            self.sockets.remove()
            self.sockets = None  # a later session of this system makes its own

    def launch(self, creds: Credentials, names: list[str], timeout: float,
               env: Optional[dict] = None) -> list[Process]:
        deadline = time.monotonic() + timeout
        procs: list[_LocalProcess] = []
        env = _machine_env(env or {})
        try:
            for i in range(0, len(names), BATCH):  # a batch starts while the next is forked
                batch = names[i:i + BATCH]
                for name, started in zip(batch, self._start(env, len(batch))):
                    procs.append(self._bootstrap(creds, name, *started))
            for proc in procs:
                proc.addr = proc.await_addr(deadline, timeout)
        except BaseException:
            for proc in procs:
                proc.kill()
                proc.stop(1)
            raise
        return procs

    def _start(self, env: dict, n: int) -> list[tuple[Union[subprocess.Popen, Child], IO[bytes], int]]:
        """Start n (at most BATCH) machine processes with env: forked from the template
        where it fits, else (or those it could not fork) fresh interpreters. Returns
        each with its status pipe, and the status pipe's descriptor in it."""
        statuses = [os.pipe() for _ in range(n)]
        writes = [w for _, w in statuses]
        started: list[tuple[Union[subprocess.Popen, Child], int]] = []
        try:
            template = self._template_for(env)
            if template is not None:
                try:
                    # A fork takes milliseconds (the first waits for the template's
                    # warm-up): one that does not answer within FORK_WAIT leaves the
                    # rest of the start timeout to fresh interpreters.
                    wait = min(FORK_WAIT, self.start_timeout / 2)
                    started = [(child, STATUS_FD) for child in template.fork(env, writes, wait)]
                except TemplateError as exc:
                    log.warning("cannot fork machines from the template (%s): starting fresh "
                                "interpreters, and a new template next time", exc)
                if len(started) < n:
                    self._drop_template(template)
            for w in writes[len(started):]:
                started.append((subprocess.Popen(
                    [sys.executable, "-m", "bigmachine._worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=os.getcwd(), env=env, pass_fds=(w,), start_new_session=True), w))
        except BaseException:
            for r, _ in statuses[len(started):]:
                os.close(r)
            for child, _ in started:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
            raise
        finally:
            for w in writes:
                os.close(w)
        return [(child, os.fdopen(r, "rb"), fd) for (child, fd), (r, _) in zip(started, statuses)]

    def _bootstrap(self, creds: Credentials, name: str, child: Union[subprocess.Popen, Child],
                   status: IO[bytes], status_fd: int) -> _LocalProcess:
        """Send a started machine its bootstrap; the handle on it."""
        config = {
            "sys_path": [p if p else os.getcwd() for p in sys.path],
            "cwd": os.getcwd(),
            "lease": self.lease,
            "keepalive_period": self.keepalive_period,
            "lost_after": self.lost_after,
            "socket_buffer": self.socket_buffer,
            "shared_memory": self.shared_memory,
            "busy_poll": self.busy_poll,
            "status_fd": status_fd,
            "parent_pipe": self.parent_pipe,
            "listen": self._listen_addr(name),
        }
        try:
            child.stdin.write(bootstrap(creds, name, config, ("127.0.0.1",)))
            child.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once; await_addr reports how, with its output
        return _LocalProcess(name, child, status)

    def _drop_template(self, template: Template) -> None:
        """Stop a template that failed (at once: it may hang); the next start makes another."""
        with self._template_lock:
            if self._template is template:
                self._template = None
        template.close(timeout=0)

    def _template_for(self, env: dict) -> Optional[Template]:
        """The session's template, started (again) if it is not running or the
        driver's environment changed since; None when env does not fit it."""
        if not supported():
            return None
        base = _machine_env({})
        if startup_vars(env) != startup_vars(base):
            return None
        with self._template_lock:
            self._check_up()
            if self._template is not None and not self._template.fits(base):
                self._template.close()
                self._template = None
            if self._template is None:
                try:
                    self._template = Template(base)
                except OSError as exc:
                    log.warning("cannot start a template for machines (%s): starting each "
                                "in a fresh interpreter", exc)
            return self._template


def _machine_env(extra: dict) -> dict:
    """A machine's environment: the driver's, with extra, unbuffered output, and this
    bigmachine first on its path."""
    env = dict(os.environ, **extra)
    env["PYTHONUNBUFFERED"] = "1"  # machine output reaches the driver as it is printed
    env["PYTHONPATH"] = os.pathsep.join(
        [_PACKAGE_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
