"""The ``multiprocessing.connection`` baseline: the twenty lines a user could write instead.

Run as a script (``python _mp.py serve unix|tcp``, by its path: it needs only
the standard library) it is the server, a child process: it reads an authkey (hex) from stdin, prints its address, and
serves each connection on a thread of its own, answering each pickled
``("Echo.echo", args, kwargs)`` request with the pickled result, until stdin
closes. The client side is the functions below, each over one connection.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from typing import Any

METHODS = {"Echo.echo": lambda x: x}


def _serve(family: str) -> None:
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    if family == "unix":
        address: Any = os.path.join(tempfile.mkdtemp(prefix="bench-mp-"), "mp.sock")
        listener = Listener(address, "AF_UNIX", authkey=authkey)
    else:
        listener = Listener(("127.0.0.1", 0), "AF_INET", authkey=authkey)
        address = listener.address
    print(repr(address), flush=True)

    def serve(conn: Any) -> None:
        try:
            while True:
                method, args, kwargs = conn.recv()
                conn.send(METHODS[method](*args, **kwargs))
        except EOFError:
            pass

    def accept() -> None:
        while True:
            threading.Thread(target=serve, args=(listener.accept(),), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()
    listener.close()  # removes its Unix socket
    if family == "unix":
        os.rmdir(os.path.dirname(address))


class MPServer:
    """The server in a child process; family "unix" or "tcp"."""

    def __init__(self, family: str = "unix"):
        self.family = family
        self.authkey = os.urandom(32)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", family],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(self.authkey.hex() + "\n")
        self.proc.stdin.flush()
        self.address = eval(self.proc.stdout.readline())  # a str or a (host, port) tuple we printed

    def connect(self) -> Any:
        return Client(self.address, "AF_UNIX" if self.family == "unix" else "AF_INET",
                      authkey=self.authkey)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)

    def __enter__(self) -> "MPServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ping_round(conn: Any, n: int) -> list:
    """n sequential calls; the nanoseconds of each."""
    out = []
    clock = time.perf_counter_ns
    request = ("Echo.echo", (1,), {})
    for _ in range(n):
        t = clock()
        conn.send(request)
        r = conn.recv()
        out.append(clock() - t)
    assert r == 1
    return out


def pipelined(conn: Any, n: int, window: int) -> float:
    """n calls with window in flight from one thread; seconds."""
    t = time.perf_counter()
    sent = min(window, n)
    for i in range(sent):
        conn.send(("Echo.echo", (i,), {}))
    for done in range(n):
        assert conn.recv() == done
        if sent < n:
            conn.send(("Echo.echo", (sent,), {}))
            sent += 1
    return time.perf_counter() - t


def threads_behind_a_lock(pool: Any, conn: Any, n: int, window: int) -> float:
    """n calls from window threads sharing one connection behind a lock; seconds."""
    ids = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(ids, None)
                if i is None:
                    return
                conn.send(("Echo.echo", (i,), {}))
                r = conn.recv()
            assert r == i

    t = time.perf_counter()
    for f in [pool.submit(worker) for _ in range(window)]:
        f.result()
    return time.perf_counter() - t


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    _serve(sys.argv[2])
