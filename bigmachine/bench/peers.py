"""Small calls beside other Python RPC systems: ping and calls/s, one table.

    python -m bigmachine bench peers [--calls 2000] [--rate-calls 10000] [--inflight 100] [--rounds 3]
                          [--only NAME,...] [--json PATH]

Each system serves an ``echo(x) -> x`` from a child process on this host and
is called from here:

- ``bigmachine``: ``m.call("Echo.echo", 1)`` on ``bm.Local()`` (a Unix socket);
  rate: ``acall`` with ``inflight`` in flight;
- ``multiprocessing.connection`` (stdlib, always): pickled request and reply
  over a Unix socket, one thread per side; rate: ``inflight`` requests ahead;
- ``execnet`` (a popen gateway, a channel): rate: ``inflight`` items ahead on
  the channel;
- ``Pyro5`` (a daemon, a proxy, TCP): rate: ``inflight`` threads with a
  proxy each (a proxy serves one thread);
- ``dask.distributed`` (a LocalCluster of one worker process, ``client.submit``
  of a pure function): rate: ``inflight`` futures ahead, each gathered in turn;
- ``ray`` (an actor in a local cluster): rate: ``inflight`` calls ahead.

Systems that are not installed are skipped (``pip install "bigmachine[bench]"``
installs them). Ping is the median of ``rounds`` x ``calls`` sequential calls; calls/s
the median over rounds. Ratios are to ``multiprocessing.connection`` in the
same run.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import _mp
from ._common import json_arg, median, print_header, write_json
from ._echo import Echo


def timed(call: Callable[[], Any], n: int) -> list:
    """Nanoseconds of n sequential calls."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        call()
        out.append(clock() - t)
    return out


def window(submit: Callable[[int], Any], wait: Callable[[Any], Any], n: int, inflight: int) -> float:
    """Seconds for n calls kept inflight ahead: submit(i) starts one, wait(handle) ends it."""
    t = time.perf_counter()
    pending = [submit(i) for i in range(min(inflight, n))]
    sent, head = len(pending), 0
    while head < len(pending):
        wait(pending[head])
        pending[head] = None
        head += 1
        if sent < n:
            pending.append(submit(sent))
            sent += 1
    return time.perf_counter() - t


# ---- the systems: each yields (ping_once, calls_in_flight(n, inflight) -> seconds) ----


@contextlib.contextmanager
def bigmachine() -> Any:
    import bigmachine as bm

    with bm.start(bm.Local()) as b:
        m, = b.start(1, services={"Echo": Echo()})

        def rate(n: int, inflight: int) -> float:
            async def run() -> float:
                ids = iter(range(n))

                async def worker() -> None:
                    for i in ids:
                        await m.acall("Echo.echo", i)

                t = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(inflight)))
                return time.perf_counter() - t

            return asyncio.run(run())

        yield (lambda: m.call("Echo.echo", 1)), rate


@contextlib.contextmanager
def multiprocessing_connection() -> Any:
    with _mp.MPServer("unix") as server:
        conn = server.connect()
        request = ("Echo.echo", (1,), {})

        def ping() -> Any:
            conn.send(request)
            return conn.recv()

        yield ping, lambda n, inflight: _mp.pipelined(conn, n, inflight)
        conn.close()


@contextlib.contextmanager
def execnet_channel() -> Any:
    import execnet

    gw = execnet.makegateway("popen")
    ch = gw.remote_exec("for item in channel:\n    channel.send(item)\n")

    def ping() -> Any:
        ch.send(1)
        return ch.receive()

    yield ping, lambda n, inflight: window(ch.send, lambda _: ch.receive(), n, inflight)
    ch.close()
    gw.exit()


PYRO_SERVER = """
import sys, Pyro5.api
Pyro5.config.THREADPOOL_SIZE = 256  # a worker per connected proxy: one per calling thread
@Pyro5.api.expose
class Echo:
    def echo(self, x):
        return x
daemon = Pyro5.api.Daemon(host="127.0.0.1")
print(daemon.register(Echo), flush=True)
threading = __import__("threading")
threading.Thread(target=daemon.requestLoop, daemon=True).start()
sys.stdin.read()
"""


@contextlib.contextmanager
def pyro5() -> Any:
    import Pyro5.api

    proc = subprocess.Popen([sys.executable, "-c", PYRO_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        uri = proc.stdout.readline().strip()
        proxy = Pyro5.api.Proxy(uri)

        def rate(n: int, inflight: int) -> float:
            ids = iter(range(n))
            lock = threading.Lock()

            def worker() -> None:
                with Pyro5.api.Proxy(uri) as p:
                    while True:
                        with lock:
                            i = next(ids, None)
                        if i is None:
                            return
                        p.echo(i)

            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(inflight) as pool:
                for f in [pool.submit(worker) for _ in range(inflight)]:
                    f.result()
            return time.perf_counter() - t

        yield (lambda: proxy.echo(1)), rate
        proxy._pyroRelease()
    finally:
        proc.stdin.close()
        proc.wait(10)


def _echo(x: Any) -> Any:
    return x


@contextlib.contextmanager
def dask_distributed() -> Any:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def ping() -> Any:
            return client.submit(_echo, 1, pure=False).result()

        def rate(n: int, inflight: int) -> float:
            return window(lambda i: client.submit(_echo, i, pure=False), lambda f: f.result(), n, inflight)

        yield ping, rate


@contextlib.contextmanager
def ray_actor() -> Any:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class RayEcho:
            def echo(self, x: Any) -> Any:
                return x

        actor = RayEcho.remote()
        yield (lambda: ray.get(actor.echo.remote(1))), \
            lambda n, inflight: window(actor.echo.remote, ray.get, n, inflight)
    finally:
        ray.shutdown()


SYSTEMS = {
    "bigmachine": bigmachine,
    "multiprocessing.connection": multiprocessing_connection,
    "execnet": execnet_channel,
    "Pyro5": pyro5,
    "dask.distributed": dask_distributed,
    "ray": ray_actor,
}


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000, help="sequential calls per ping round")
    ap.add_argument("--rate-calls", type=int, default=10_000, help="calls per calls/s round")
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names to run")
    args = ap.parse_args(argv)
    info = print_header(f"peers: ping and calls/s ({args.inflight} in flight) of Python RPC systems")
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    figures: dict = {}
    for name, system in SYSTEMS.items():
        if only and name not in only:
            continue
        try:
            ctx = system()
            ping, rate = ctx.__enter__()
        except ImportError as exc:
            print(f"{name}: not installed ({exc.name}); skipped")
            continue
        try:
            n_ping = args.calls if name not in ("dask.distributed", "ray") else args.calls // 10
            n_rate = args.rate_calls if name not in ("dask.distributed", "ray") else args.rate_calls // 10
            timed(ping, max(10, n_ping // 10))  # warm up
            pings, rates = [], []
            for _ in range(args.rounds):
                pings += timed(ping, n_ping)
                rates.append(n_rate / rate(n_rate, args.inflight))
            figures[name] = {"ping_us": median(pings) / 1e3, "calls_per_s": median(rates),
                             "ping_calls": len(pings), "rate_calls": n_rate}
            print(f"{name}: ping {figures[name]['ping_us']:.1f} us, {figures[name]['calls_per_s']:.0f} calls/s")
        finally:
            ctx.__exit__(None, None, None)

    base = figures.get("multiprocessing.connection")
    print(f"\n{'':28} {'ping us':>9} {'calls/s':>9} {'ping / mp':>10} {'calls/s / mp':>13}")
    for name, f in figures.items():
        ping_ratio = f["ping_us"] / base["ping_us"] if base else float("nan")
        rate_ratio = f["calls_per_s"] / base["calls_per_s"] if base else float("nan")
        f.update(ping_ratio_to_mp=ping_ratio, rate_ratio_to_mp=rate_ratio)
        print(f"{name:28} {f['ping_us']:9.1f} {f['calls_per_s']:9.0f} {ping_ratio:10.2f} {rate_ratio:13.2f}")
    write_json(path, {"benchmark": "peers", "implementation": info, "inflight": args.inflight,
                      "rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
