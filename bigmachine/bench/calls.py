"""Throughput of small calls with many in flight from one client.

    python -m bigmachine bench calls [--rounds 5] [--calls 10000] [--inflight 100] [--json PATH]

Measures calls/s, in one run and against child processes:

- raw_pipelined: blocking client keeps ``inflight`` 24-byte requests ahead on
                 one socket; the server echoes whatever complete frames it has
                 (the limit);
- raw_asyncio:   an asyncio client with ``inflight`` coroutines, each awaiting
                 a future resolved by id from the replies, against the same
                 server (the floor for any asyncio RPC client);
- acall:         ``inflight`` coroutines each awaiting ``m.acall("Echo.echo", i)``
                 in turn (``inflight`` calls in flight at all times);
- acall_async_method: the same for ``Echo.aecho`` (served on the machine's loop);
- threads:       ``inflight`` threads each making blocking ``m.call`` in turn.

Median over rounds; ratio to raw_pipelined.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading
import time
from typing import Optional

import bigmachine as bm

from ._common import HEADER, Echo, RawServer, json_arg, median, print_header, write_json

REQ = HEADER.pack(1, 0, 0, 1, 8) + (7).to_bytes(8, "little")


def raw_pipelined(sock, n: int, window: int) -> float:
    size = len(REQ)
    buf = bytearray(1 << 16)
    t = time.perf_counter()
    first = min(window, n)
    sock.sendall(REQ * first)
    sent, done, have = first, 0, 0
    while done < n:
        k = sock.recv_into(buf)
        if k == 0:
            raise EOFError
        have += k
        complete, have = divmod(have, size)
        done += complete
        more = min(complete, n - sent)
        if more:
            sock.sendall(REQ * more)
            sent += more
    return time.perf_counter() - t


def raw_asyncio(port: int, n: int, window: int) -> float:
    async def run() -> float:
        loop = asyncio.get_running_loop()
        waiting: dict = {}

        class P(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = bytearray()

            def data_received(self, data: bytes) -> None:
                buf = self.buf
                buf += data
                pos = 0
                while len(buf) - pos >= 24:
                    sid = HEADER.unpack_from(buf, pos)[3]
                    fut = waiting.pop(sid)
                    fut.set_result(bytes(buf[pos + 16:pos + 24]))
                    pos += 24
                del buf[:pos]

        transport, _ = await loop.create_connection(P, "127.0.0.1", port)
        transport.write(b"PIPE")
        ids = iter(range(1, n + 1))

        async def worker() -> None:
            for sid in ids:
                fut = loop.create_future()
                waiting[sid] = fut
                transport.write(HEADER.pack(1, 0, 0, sid, 8) + sid.to_bytes(8, "little"))
                await fut

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        elapsed = time.perf_counter() - t
        transport.close()
        return elapsed

    return asyncio.run(run())


def acalls(m, method: str, n: int, window: int) -> float:
    async def run() -> float:
        await m.acall(method, 0)
        ids = iter(range(n))

        async def worker() -> None:
            for i in ids:
                assert await m.acall(method, i) == i

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        return time.perf_counter() - t

    return asyncio.run(run())


def thread_calls(pool, m, n: int, window: int) -> float:
    ids = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(ids, None)
            if i is None:
                return
            assert m.call("Echo.echo", i) == i

    t = time.perf_counter()
    for f in [pool.submit(worker) for _ in range(window)]:
        f.result()
    return time.perf_counter() - t


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--no-threads", action="store_true")
    args = ap.parse_args(argv)
    info = print_header(f"calls: {args.calls} small calls, {args.inflight} in flight, one client")
    n, w = args.calls, args.inflight

    secs: dict = {k: [] for k in ("raw_pipelined", "raw_asyncio", "acall", "acall_async_method")}
    if not args.no_threads:
        secs["threads"] = []
    with RawServer("threads") as raw, bm.start(bm.Local()) as b, \
            concurrent.futures.ThreadPoolExecutor(w) as pool:
        m, = b.start(1, services={"Echo": Echo()})
        sock = raw.connect(b"PIPE")
        raw_pipelined(sock, n // 10, w)  # warm up
        acalls(m, "Echo.echo", n // 10, w)
        for _ in range(args.rounds):
            secs["raw_pipelined"].append(raw_pipelined(sock, n, w))
            secs["raw_asyncio"].append(raw_asyncio(raw.port, n, w))
            secs["acall"].append(acalls(m, "Echo.echo", n, w))
            secs["acall_async_method"].append(acalls(m, "Echo.aecho", n, w))
            if "threads" in secs:
                secs["threads"].append(thread_calls(pool, m, n, w))
        sock.close()

    figures: dict = {}
    base = n / median(secs["raw_pipelined"])
    floor = n / median(secs["raw_asyncio"])
    print(f"\n{'':20} {'calls/s':>10} {'us/call':>9} {'raw / x':>8} {'raw_asyncio / x':>16}")
    for name, s in secs.items():
        rate = n / median(s)
        figures[name] = {"calls_per_s": rate, "us_per_call": 1e6 / rate,
                         "raw_over_this": base / rate, "raw_asyncio_over_this": floor / rate,
                         "rounds_s": s}
        print(f"{name:20} {rate:10.0f} {1e6 / rate:9.1f} {base / rate:8.1f} {floor / rate:16.1f}")
    acall = figures["acall"]["calls_per_s"]
    print(f"\nratio raw_pipelined / acall = {base / acall:.1f}x; raw_asyncio / acall = {floor / acall:.1f}x")
    write_json(path, {"benchmark": "calls", "implementation": info, "calls": n, "inflight": w,
                      "rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
