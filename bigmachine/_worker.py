"""The machine process: ``python -m bigmachine._worker``, started by a system.

It reads its bootstrap from stdin (a JSON config line, then the cluster
credentials and its owner token, then with TLS its certificate and key as a
JSON line), serves until its owner lets it go, and on the way out kills any
processes its services left in its process group, and its children that left
it (a helper started in a session of its own). It never writes a core
file (its memory holds the cluster's secrets) and raises its open-file limit.

Config keys: name, sys_path, cwd, lease, keepalive_period, lost_after,
parent_pipe, hold (cache entries to flock while it runs); listen (the address
to listen on: "unix:/path" or "host:port"); status_fd (a pipe for the status
line). The status line, ``bigmachine-status listening ADDR``, goes to
status_fd, or without one (SSH, where there is no extra pipe) to stdout before
anything else the machine prints. The bootstrap's format and the status line
are backends/_bootstrap.py's.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

from ._sockopts import BUSY_POLL, SOCKET_BUFFER
from ._limits import no_core_dumps, raise_open_files
from ._node import Node
from ._runtime import start_machine
from .backends._bootstrap import STATUS_PREFIX, hold, read_bootstrap


log = logging.getLogger("bigmachine.worker")

def main(before_services: Optional[Callable[[], None]] = None) -> None:
    """Run the machine whose bootstrap is on stdin until it stops; before_services runs
    once as its owner registers the services (a forked machine's set-up, see _template)."""
    no_core_dumps()
    raise_open_files()
    stdin = sys.stdin.buffer
    config, creds, owner_token, identity = read_bootstrap(stdin)
    hold(config.get("hold", ()))
    sys.path[:] = config["sys_path"]
    os.chdir(config["cwd"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    stopped = threading.Event()
    reasons: list[str] = []

    def on_stop(reason: str) -> None:
        reasons.append(reason)
        stopped.set()

    node = Node(creds, config["name"], identity=identity,
                socket_buffer=config.get("socket_buffer", SOCKET_BUFFER),
                shared_memory=config.get("shared_memory", False),
                busy_poll=config.get("busy_poll", BUSY_POLL))
    addr = start_machine(node, config["lease"], on_stop, owner_token, listen=config["listen"],
                         keepalive_period=config["keepalive_period"], lost_after=config["lost_after"],
                         before_services=before_services)
    status = f"{STATUS_PREFIX}{addr}\n"
    if config.get("status_fd") is None:
        sys.stdout.write(status)
        sys.stdout.flush()
    else:
        os.write(config["status_fd"], status.encode())
        os.close(config["status_fd"])
    if config.get("parent_pipe", True):
        threading.Thread(target=_watch_parent, args=(stdin, on_stop), daemon=True).start()
    try:
        stopped.wait()
        if reasons and reasons[0] != "shut down by its owner":
            _kill_group()  # first: they may hold our output pipes
            _nonblocking_output()
            log.warning("machine %s stopping: %s", config["name"], reasons[0])
    finally:
        # Even if that write failed (the driver, which reads our output, may be
        # dead or stopped): an exception here would leave the interpreter waiting
        # for the pool's threads, that is for the calls still running.
        _exit(0)


def _watch_parent(stdin, on_stop) -> None:
    while stdin.read(65536):
        pass
    on_stop("the driver is gone")


def _nonblocking_output() -> None:
    """Never block on our output on the way out: a stopped driver does not read it."""
    for fd in (1, 2):
        try:
            os.set_blocking(fd, False)
        except OSError:
            pass


def _exit(code: int) -> None:
    """Kill what we started, flush our output, and leave without waiting for threads."""
    _kill_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _kill_group() -> None:
    """Kill the processes our services started: our process group, and each child
    that left it (a helper started in a session of its own) with its group."""
    me = os.getpid()
    group = os.getpgrp()
    _kill_children_elsewhere(group)
    if group != me:
        return  # not our own group: leave others' processes alone
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == me:
            continue
        try:
            if os.getpgid(pid) == group:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_children_elsewhere(group: int) -> None:
    """SIGKILL our children outside group, with the process group each leads (a
    session of its own). Their children that left those groups too (daemons)
    are out of reach."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:
            continue
        for pid in children:
            try:
                theirs = os.getpgid(pid)
                if theirs == pid:
                    os.killpg(pid, signal.SIGKILL)
                elif theirs != group:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


if __name__ == "__main__":
    main()
