"""Instructions per small call, counted by valgrind: a figure the load does not move.

    python -m bigmachine bench instructions [--calls 2000] [--json PATH]

Wall-clock pings on a shared 2-vCPU host swing by 2x with where the
scheduler puts the two ends; the instructions a call executes do not. Each
workload runs twice under ``valgrind --tool=callgrind`` (``--calls`` more
calls the second time), and the difference divided by ``--calls`` is what one
call costs, start-up cancelled out. Both ends run in one process, so the count
covers the caller and the server:

- call:    ``m.call("Echo.echo", 1)`` on ``bm.InProcess()`` (its links are the
           Unix sockets of ``bm.Local()``, the same transport);
- acall:   ``await m.acall("Echo.echo", i)``, 100 in flight (batching makes
           this one vary by some 10% between runs);
- call_async_method, acall_async_100_in_flight: the same calls of
           ``Echo.aecho``, an ``async def`` served on the machine's loop;
- mp_unix: ``multiprocessing.connection`` over a Unix socket, a client and a
           server thread, pickled request and reply (the baseline).

Needs valgrind (Debian: ``apt-get install valgrind``); says so and stops without it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from ._common import json_arg, print_header, write_json

WARM = 300

_BIGMACHINE = """
import asyncio, sys
import bigmachine as bm
from bigmachine.bench._echo import Echo
n, how, method = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with bm.start(bm.InProcess()) as b:
    m, = b.start(1, services={"Echo": Echo()})
    if how == "call":
        for _ in range(n):
            m.call(method, 1)
    else:
        async def run():
            ids = iter(range(n))
            async def worker():
                for i in ids:
                    await m.acall(method, i)
            await asyncio.gather(*(worker() for _ in range(100)))
        asyncio.run(run())
"""

_MP = """
import os, sys, tempfile, threading
from multiprocessing.connection import Client, Listener
n = int(sys.argv[1])
address = os.path.join(tempfile.mkdtemp(prefix="bench-mp-"), "mp.sock")
listener = Listener(address, "AF_UNIX", authkey=b"k" * 32)
def serve():
    conn = listener.accept()
    try:
        while True:
            method, args, kwargs = conn.recv()
            conn.send(args[0])
    except EOFError:
        pass
threading.Thread(target=serve, daemon=True).start()
client = Client(address, "AF_UNIX", authkey=b"k" * 32)
for _ in range(n):
    client.send(("Echo.echo", (1,), {}))
    client.recv()
client.close()
listener.close()
"""


def count(script: str, n: int, *extra: str) -> int:
    """Instructions valgrind counted for one run of script with n calls."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # no BLAS threads spinning in the count
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", script, str(n), *extra],
                         env=env, capture_output=True, text=True, timeout=900, check=True)
    found = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"valgrind printed no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_call(script: str, calls: int, *extra: str) -> float:
    return (count(script, WARM + calls, *extra) - count(script, WARM, *extra)) / calls


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser(prog="python -m bigmachine bench instructions")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    info = print_header("instructions: per small call, both ends, counted by callgrind")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count")
        return
    figures = {"call": per_call(_BIGMACHINE, args.calls, "call", "Echo.echo"),
               "call_async_method": per_call(_BIGMACHINE, args.calls, "call", "Echo.aecho"),
               "acall_100_in_flight": per_call(_BIGMACHINE, args.calls, "acall", "Echo.echo"),
               "acall_async_100_in_flight": per_call(_BIGMACHINE, args.calls, "acall", "Echo.aecho"),
               "mp_unix": per_call(_MP, args.calls)}
    print(f"\n{'':26} {'instructions':>13} {'x mp_unix':>10}")
    for name, value in figures.items():
        print(f"{name:26} {value:13,.0f} {value / figures['mp_unix']:10.2f}")
    write_json(path, {"benchmark": "instructions", "implementation": info, "figures": figures})


if __name__ == "__main__":
    main()
