"""What every system does to start a machine process, whatever carries it.

- The bootstrap: what a new machine reads first on its stdin (see _worker):
  a JSON config line, the cluster's credentials with its owner token, and
  with TLS its own certificate and key as a JSON line. It never travels in
  argv, the environment or a file.
- The status line: the machine's first report, ``bigmachine-status listening
  ADDR``, on its stdout or on a status pipe. A shell that starts a machine
  may report its pid first (``bigmachine-status pid PID``), so that the
  driver can kill the machine's process group on a host.
- The hold: a machine started from a host's cache holds a shared flock on
  each cache entry it uses (bundles, environment, run dir) while it runs.
- The output: a machine's stdout and stderr reach the driver's stderr line by
  line with a prefix (its name, and on another host the host's), never
  blocking the machine (_output.py), and the last lines are kept for the
  error that says why it failed to start.
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import threading
import time
from typing import IO, Optional, Sequence

from .._auth import BOOTSTRAP_SIZE, Credentials
from .._tls import Identity
from ..errors import Error
from . import Process, _output

STATUS_PREFIX = "bigmachine-status listening "
PID_PREFIX = "bigmachine-status pid "
TAIL_LINES = 20


def bootstrap(creds: Credentials, name: str, config: dict, hosts: Sequence[str]) -> bytes:
    """What a new machine reads first: its config line, the cluster's
    credentials with its owner token, and with TLS its certificate for hosts."""
    config = dict(config, name=name, tls=creds.ca is not None)
    data = json.dumps(config).encode() + b"\n" + creds.encode_for(name)
    if creds.ca is not None:
        data += json.dumps(creds.ca.issue(name, tuple(hosts)).to_dict()).encode() + b"\n"
    return data


def read_bootstrap(stream: IO[bytes]) -> tuple[dict, Credentials, bytes, Optional[Identity]]:
    """The machine's side of bootstrap(): (config, credentials, owner token, identity)."""
    config = json.loads(stream.readline())
    creds, owner_token = Credentials.decode(stream.read(BOOTSTRAP_SIZE))
    identity = Identity.from_dict(json.loads(stream.readline())) if config.get("tls") else None
    return config, creds, owner_token, identity


def hold(paths: Sequence[str]) -> None:
    """The machine's side of a host's cache: a shared flock on each entry it uses, kept
    until the process exits, so that pruning (remote/cache.py) never removes them under it."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise Error(f"{path} was pruned from the cache while the machine started; "
                        "start it again")


class Output:
    """One machine's output streams, each copied by a thread of its own.

    who names the machine in errors ("m3", "m3 on host"); prefix starts each
    line copied to the driver's stderr. The stream given status=True carries
    the status line: until it arrives, status lines there are read, not copied.
    """

    def __init__(self, who: str, prefix: str):
        self.who = who
        self.prefix = prefix
        self.addr = ""
        self.pid: Optional[int] = None
        self.reported = threading.Event()  # the status line came, or its stream ended
        self.tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        self.threads: list[threading.Thread] = []

    def pump(self, stream: IO[bytes], name: str, status: bool = False) -> None:
        """Copy stream's lines until it ends, in a thread called name."""
        thread = threading.Thread(target=self._copy, args=(stream, status), daemon=True,
                                  name=name)
        self.threads.append(thread)
        thread.start()

    def _copy(self, stream: IO[bytes], status: bool) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if status and not self.reported.is_set() and self._status(line):
                    continue
                self.tail.append(line)
                _output.forward(self.who, self.prefix + line + "\n")
        except (OSError, EOFError, ValueError):
            pass  # the stream went away; the system tells how the machine ended
        finally:
            if status:
                self.reported.set()
            try:
                stream.close()
            except (OSError, ValueError):
                pass

    def _status(self, line: str) -> bool:
        if line.startswith(PID_PREFIX) and line[len(PID_PREFIX):].isdigit():
            self.pid = int(line[len(PID_PREFIX):])
            return True
        if line.startswith(STATUS_PREFIX):
            self.addr = line[len(STATUS_PREFIX):].strip()
            self.reported.set()
            return True
        return False

    def join(self, timeout: float) -> None:
        """Wait for the streams to end and their lines to reach the driver's stderr."""
        for thread in self.threads:
            thread.join(timeout)
        _output.flush(timeout)


class Spawned(Process):
    """A machine process whose output and status line come through an Output."""

    output: Output

    def settle(self) -> None:
        """Wait briefly for an ended machine's exit status and last output lines."""
        self.output.join(1.0)

    def await_addr(self, deadline: float, timeout: float) -> str:
        """The address the machine reported, or an Error saying why it did not."""
        self.output.reported.wait(max(0.0, deadline - time.monotonic()))
        if self.output.addr:
            return self.output.addr
        if not self.output.reported.is_set():
            raise self.error(f"did not start within {timeout:g} s", ended=False)
        raise self.error("exited before it was ready")

    def error(self, what: str, ended: bool = True) -> Error:
        """An Error saying what happened to the machine, with its last output lines."""
        if ended:
            self.settle()
        lines = "\n".join(f"  {line}" for line in self.output.tail)
        return Error(f"machine {self.output.who} {what} ({self.describe_exit()})"
                     + (f"; its last output:\n{lines}" if lines else ""))
