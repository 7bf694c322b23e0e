"""Arrays between machines on one host (shared memory), against raw sockets and Ray.

    python -m bigmachine bench shm [--sizes 64,512] [--runs 5]

Per size, median GB/s over runs, in one run, with shared memory (``shm_``,
the default on one host) and with the socket path (``sock_``,
``shared_memory=False``):

- d2m: ``m.call("Echo.nbytes", a)`` (a fresh array of the driver's);
- m2d: ``m.call("Echo.make", n)`` (the machine returns an array it made);
- m2m: machine A sends its array to B (``Echo.push``), timed in A;
- forward: the driver passes an array it received, unwritten, to another machine;
- raw_tcp / raw_tcp_warm: a child process receives the bytes over loopback TCP
  into a fresh numpy array / into one buffer it reuses; raw_unix: the same,
  fresh, over a Unix socket;
- ray: ``ray.get(ray.put(a))`` from a worker task, when Ray is installed.

Ratios are to raw_tcp (fresh), with the warm-buffer ratio beside them.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import tempfile
import time
from typing import Any, Optional

import numpy as np

import bigmachine as bm

from ._common import median, print_header
from ._echo import Echo

MiB = 1 << 20


def _sink(family: int, addr: Any, nbytes: int, runs: int, warm: bool) -> None:
    """Child: receive runs messages of nbytes, each into a fresh (or one warm) array."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(addr)
    buf = np.empty(nbytes, np.uint8)
    for _ in range(runs):
        if not warm:
            buf = np.empty(nbytes, np.uint8)
        view, got = memoryview(buf), 0
        while got < nbytes:
            got += sock.recv_into(view[got:])
        sock.sendall(b"k")
    sock.close()


def raw(kind: str, a: np.ndarray, runs: int, warm: bool = False) -> list:
    """Seconds per send of a's bytes to a child over kind ("tcp" or "unix")."""
    data = memoryview(a).cast("B")
    if kind == "tcp":
        family, lsock = socket.AF_INET, socket.socket(socket.AF_INET)
        lsock.bind(("127.0.0.1", 0))
    else:
        family, lsock = socket.AF_UNIX, socket.socket(socket.AF_UNIX)
        lsock.bind(os.path.join(tempfile.mkdtemp(), "s"))
    lsock.listen(1)
    child = mp.get_context("fork").Process(target=_sink, args=(family, lsock.getsockname(),
                                                               a.nbytes, runs + 1, warm))
    child.start()
    conn, _ = lsock.accept()
    times = []
    for i in range(runs + 1):
        t = time.perf_counter()
        conn.sendall(data)
        conn.recv(1)
        if i:
            times.append(time.perf_counter() - t)
    conn.close()
    lsock.close()
    child.join()
    return times


def ray_times(a: np.ndarray, runs: int) -> Optional[list]:
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def last(x: Any) -> float:
            return float(x[-1])

        ray.get(last.remote(a))
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            ray.get(last.remote(ray.put(a)))
            times.append(time.perf_counter() - t)
        return times
    finally:
        ray.shutdown()


def timed(fn: Any, runs: int) -> list:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,512", help="MiB, comma separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args(argv)
    print_header("shm: float64 arrays between processes on one host")
    sizes = [int(x) for x in args.sizes.split(",")]
    figures: dict = {mib: {} for mib in sizes}
    for shared in (False, True):  # the socket path, then shared memory (the default)
        prefix = "shm_" if shared else "sock_"
        with bm.start(bm.Local(), shared_memory=shared) as b:
            ma, mb = b.start(2, services={"Echo": Echo()})
            for mib in sizes:
                n = mib * MiB // 8
                figures[mib].update({prefix + k: v for k, v in bigmachine_times(ma, mb, n, args.runs)
                                     .items()})
    for mib in sizes:
        n = mib * MiB // 8
        a = np.arange(n, dtype=np.float64)
        t = figures[mib]
        t["raw_tcp"] = raw("tcp", a, args.runs)
        t["raw_tcp_warm"] = raw("tcp", a, args.runs, warm=True)
        t["raw_unix"] = raw("unix", a, args.runs)
        if not args.no_ray:
            r = ray_times(a, args.runs)
            if r is not None:
                t["ray"] = r
        fig = {k: n * 8 / median(v) / 1e9 for k, v in t.items()}
        base, warm = fig["raw_tcp"], fig["raw_tcp_warm"]
        print(f"\n{mib} MiB x{args.runs}  GB/s   x raw_tcp (fresh)   x raw_tcp_warm")
        for k, v in fig.items():
            print(f"  {k:16} {v:7.2f}   x{v / base:6.2f}   x{v / warm:6.2f}", flush=True)


def bigmachine_times(ma: bm.Machine, mb: bm.Machine, n: int, runs: int) -> dict:
    """Seconds per run: driver to machine, machine to driver, machine to machine, and
    the driver passing on an array it received (unwritten)."""
    a = np.arange(n, dtype=np.float64)
    t = {"d2m": timed(lambda: ma.call("Echo.nbytes", a), runs),
         "m2d": timed(lambda: ma.call("Echo.make", n), runs)}
    ma.call("Echo.push", mb.addr, n, 1)
    t["m2m"] = ma.call("Echo.push", mb.addr, n, runs)
    box = [ma.call("Echo.make", n)]
    t["forward"] = timed(lambda: mb.call("Echo.nbytes", box[0]), runs)
    ma.call("Echo.drop")
    return t

if __name__ == "__main__":
    main()
