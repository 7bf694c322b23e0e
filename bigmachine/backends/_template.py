"""The template: a fork server from which Local machines start in milliseconds.

A Local session starts it as it starts (``python -c "...main()" FD`` running
main() below, in a process session of its own, with the machines'
environment and thread pools limited to one thread: _blas.LIMITS), so that it
warms up while the driver does. It imports bigmachine's machine side, numpy
and cloudpickle with the cyclic collector off (Python's advice for a fork
server: collections during those imports found nothing and cost ~10 ms),
freezes its heap (gc.freeze: the machines' collections then never write to,
and so copy, the pages they share with it), turns the collector on, then
serves fork requests on the socket FD, one at a time, from its only thread.
Once it has answered the first, it imports what many machines use but none
needs to start (numpy.random, 5-8 ms) when the driver asks again or after a
quiet moment (the first machines have started by then), and freezes again.
A request carries the machines' environment and four descriptors per
machine, up to BATCH machines (each machine's stdin, stdout, stderr and
status pipe: they become its 0, 1, 2 and STATUS_FD); the reply lists the
machines' pids.
(Forking a first machine before importing numpy was measured slower: its
services imported numpy themselves while the template did the same.)

- A request's machines are forked by one intermediate process, which exits
  once it has forked them all, so they are reparented to the driver, a child
  subreaper while it asks: the driver waits for each and learns how it
  ended, as for a process it spawned, and a machine outlives its template.
- The template holds no secret: the driver writes the machine's bootstrap
  (its credentials and owner token) to the machine's stdin after the fork.
- Each machine has its own process group, its environment (the request's),
  RNGs that differ from every other machine's (random reseeds itself at
  fork; numpy's global one is reseeded here), and its thread pools sized as a
  fresh interpreter's would be (_blas.restore), as its owner registers its
  services: no service computes before, and a new pool's threads spin for a
  while, which slowed the start itself when they were made at the fork.
- A variable an interpreter reads at start-up (startup_vars) cannot change
  in a fork: a machine whose environment differs there is spawned fresh.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import IO, Iterator, Mapping, NoReturn, Optional, Sequence

from .._blas import LIMITS
from ..errors import Error

STATUS_FD = 3          # the status pipe's descriptor in a forked machine
BATCH = 16             # machines per request, forked by one intermediate (SCM_RIGHTS fits 63)
MAX_REQUEST = 1 << 20  # bytes of one fork request (the machines' environment)
LATER_AFTER = 0.05     # seconds the template waits after its first fork before it imports LATER_IMPORTS
# Read by the interpreter, the C library, the thread pools, or by numpy and bigmachine
# as they are imported (BIGMACHINE_COUNTERS, BIGMACHINE_FAULTS).
_STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "OPENBLAS_", "GOTO_",
                     "MKL_", "BLIS_", "VECLIB_", "NPY_", "NUMPY_", "BIGMACHINE_")
# What the template imports before its first fork (with the collector off: main's caller
# turned it off), what every machine runs; and after it, what many machines use (numpy
# imports numpy.random lazily; a machine forked before has it imported when it needs it,
# and seeded afresh then).
FIRST_IMPORTS = ("numpy", "cloudpickle", "bigmachine._worker")
LATER_IMPORTS = ("numpy.random",)
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class TemplateError(Error):
    """The template could not fork machines: it is gone, or it refused."""


def startup_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of env that an interpreter (or a library it loads) reads at start-up."""
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_PREFIXES)}


def supported() -> bool:
    """Whether machines can be forked from a template on this platform."""
    return sys.platform == "linux" and hasattr(os, "fork") and hasattr(socket, "send_fds")


# ---- the driver's side -----------------------------------------------------------


class Child:
    """A forked machine, as the driver sees it: the part of subprocess.Popen's
    interface the Local system uses (pid, stdin, stdout, stderr, poll, wait,
    returncode: negative for a signal)."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: Optional[int] = None
        self._lock = threading.Lock()

    def poll(self) -> Optional[int]:
        """The exit code if the machine has ended (it is then reaped), else None."""
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 0  # reaped by someone else (SIGCHLD ignored): as Popen says
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the machine to end; subprocess.TimeoutExpired after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"machine pid {self.pid}", timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode


class Template:
    """The driver's handle on one running template (started here, with env)."""

    def __init__(self, env: Mapping[str, str]):
        self.startup = startup_vars(env)
        self.executable = sys.executable
        self._lock = threading.Lock()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c",
                 f"import gc; gc.disable(); from {__name__} import main; main()",
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=dict(env, **LIMITS),
                pass_fds=(theirs.fileno(),), start_new_session=True)
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()

    def fits(self, env: Mapping[str, str]) -> bool:
        """Whether it runs, and a machine with env (and the driver's sys.executable
        now) may be forked from it."""
        return (self.popen.poll() is None and sys.executable == self.executable
                and startup_vars(env) == self.startup)

    def fork(self, env: Mapping[str, str], statuses: Sequence[int], timeout: float) -> list[Child]:
        """Fork one machine with env per status pipe in statuses (at most BATCH), in order.

        Fewer come back when the template forked only some (it ran out of
        processes or memory); TemplateError when it could fork none.
        """
        pipes = [[os.pipe() for _ in range(3)] for _ in statuses]  # stdin, stdout, stderr
        theirs = [fd for (stdin, out, err), status in zip(pipes, statuses)
                  for fd in (stdin[0], out[1], err[1], status)]
        request = json.dumps({"env": dict(env), "count": len(statuses)}).encode()
        try:
            with self._lock, _subreaper():
                self._sock.settimeout(timeout)
                socket.send_fds(self._sock, [request], theirs)
                reply = self._sock.recv(MAX_REQUEST)
        except OSError as exc:
            reply = json.dumps({"error": f"cannot reach the template: {exc}"}).encode()
        finally:
            _close([fd for fd in theirs if fd not in statuses])
        answer = json.loads(reply) if reply else {
            "error": f"the template is gone ({self._describe_exit()})"}
        pids = answer.get("pids", [])
        for stdin, out, err in pipes[len(pids):]:
            _close([stdin[1], out[0], err[0]])
        if not pids:
            raise TemplateError(answer.get("error", "it forked no machine"))
        return [Child(pid, os.fdopen(stdin[1], "wb"), os.fdopen(out[0], "rb"),
                      os.fdopen(err[0], "rb")) for pid, (stdin, out, err) in zip(pids, pipes)]

    def _describe_exit(self) -> str:
        code = self.popen.poll()
        return "still running" if code is None else f"exit code {code}"

    def close(self, timeout: float = 2.0) -> None:
        """Stop the template (it exits when its socket closes); machines go on."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # also wakes a fork() waiting for a reply
        except OSError:
            pass  # the template is gone already
        self._sock.close()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


_subreaper_lock = threading.Lock()
_subreaper_users = 0
_subreaper_before = 0


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Make this process a child subreaper (prctl) while the block runs, so that a
    machine whose intermediate parent exits becomes our child. Nested and
    concurrent uses share one setting; a process that was a subreaper stays one."""
    global _subreaper_users, _subreaper_before
    libc = ctypes.CDLL(None, use_errno=True)
    with _subreaper_lock:
        if _subreaper_users == 0:
            before = ctypes.c_int(0)
            libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
            _subreaper_before = before.value
            if not _subreaper_before and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot become a child subreaper")
        _subreaper_users += 1
    try:
        yield
    finally:
        with _subreaper_lock:
            _subreaper_users -= 1
            if _subreaper_users == 0 and not _subreaper_before:
                libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# ---- the template's side ---------------------------------------------------------


def main() -> None:
    """Serve fork requests until the driver closes the socket (or is gone)."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    _warm(FIRST_IMPORTS)
    gc.enable()
    later = LATER_IMPORTS
    while True:
        try:
            message, fds, flags, _ = socket.recv_fds(sock, MAX_REQUEST, 4 * BATCH)
        except OSError:
            return
        if not message:
            return  # the driver closed its end, or is gone
        try:
            request = json.loads(message)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 4 * request["count"]:
                raise Error("malformed fork request")
            reply = {"pids": _fork(sock, request["env"], fds)}
        except Exception as exc:  # the driver starts these machines fresh instead
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            _close(fds)
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            return  # the driver gave up on this request (its timeout) or is gone
        if later:
            # Not while the first machines start: on 2 cores this import slowed a
            # session's first call by ~4 ms. When the driver asks again, or once it has
            # been quiet for LATER_AFTER seconds.
            quiet = select.poll()  # not select(): its descriptor may be above 1023
            quiet.register(sock, select.POLLIN)
            quiet.poll(LATER_AFTER * 1000)
            _warm(later)
            later = ()


def _warm(modules: Sequence[str]) -> None:
    """Import modules, then freeze the heap so that the machines' collections never
    write to (and so copy) the pages they share with the template."""
    for name in modules:
        importlib.import_module(name)
    gc.freeze()


def _fork(sock: socket.socket, env: dict, fds: list[int]) -> list[int]:
    """Fork a machine per four of fds through one intermediate process; their pids."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise Error(f"the template runs {threads} threads: forking it is unsafe")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    report_r, report_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(report_r)
            for i in range(0, len(fds), 4):
                pid = os.fork()
                if pid == 0:
                    os.close(report_w)
                    _machine(sock, env, fds[i:i + 4], fds)
                os.setpgid(pid, pid)  # before the driver learns the pid and may signal its group
                os.write(report_w, f"{pid} ".encode())
        finally:
            os._exit(0)  # having forked all it could: the template reports those
    os.close(report_w)
    report = b""
    try:
        while chunk := os.read(report_r, 4096):
            report += chunk
    finally:
        os.close(report_r)
        os.waitpid(middle, 0)  # once it is gone, the machines are the driver's children
    return [int(pid) for pid in report.split()]


def _machine(sock: socket.socket, env: dict, own: list[int], batch: list[int]) -> NoReturn:
    """In a forked machine: take its descriptors (own, of the batch's) and environment,
    then run it."""
    try:
        sock.close()
        for target, fd in enumerate(own):  # fds are all > 2, and only the last target is 3
            os.dup2(fd, target)
        _close([fd for fd in batch if fd > STATUS_FD])
        os.environ.clear()
        os.environ.update(env)
        _reseed()
        from .._blas import restore
        from .._worker import main as run_machine
        # Pools are restored when the owner registers the services, not here: a new
        # OpenBLAS thread spins for a while, and on 2 cores it slowed the machine's start
        # and handshake by ~14 ms (median, measured); until then no service computes.
        run_machine(before_services=lambda: restore(env))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(1)


def _reseed() -> None:
    """Reseed numpy's global RNG from the OS (random reseeds itself after a fork)."""
    random = sys.modules.get("numpy.random")
    if random is not None:
        random.seed()
