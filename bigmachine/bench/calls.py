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

Against the Python baselines the issue's targets name, over a Unix socket
(bm.Local()'s links):

- raw_python:    ``inflight`` 24-byte requests ahead on one Unix socket to a
                 Python server that decodes each frame and answers it
                 (``ECHO``), the client decoding each reply's header;
- mp_unix:       ``multiprocessing.connection`` pipelined the same way
                 (pickled requests and replies, see _mp.py);
- mp_threads:    ``inflight`` threads sharing one ``multiprocessing.connection``
                 behind a lock (beside ``threads``).

Median over rounds; each rate with its ratio to raw_python and to mp_unix.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading
import time
from typing import Optional

import bigmachine as bm

from . import _mp
from ._common import HEADER, RawServer, json_arg, median, print_header, write_json
from ._echo import Echo

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


def raw_python(sock, n: int, window: int) -> float:
    """window requests ahead; each reply's header decoded as it comes."""
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    t = time.perf_counter()
    sent = min(window, n)
    sock.sendall(b"".join(HEADER.pack(1, 0, 0, i, 8) + i.to_bytes(8, "little") for i in range(sent)))
    start = end = done = 0
    while done < n:
        k = sock.recv_into(view[end:])
        if k == 0:
            raise EOFError
        end += k
        more = []
        while end - start >= 24:
            _, _, _, sid, length = HEADER.unpack_from(buf, start)
            assert length == 8
            start += 24
            done += 1
            if sent < n:
                more.append(HEADER.pack(1, 0, 0, sent, 8) + sent.to_bytes(8, "little"))
                sent += 1
        if more:
            sock.sendall(b"".join(more))
        buf[:end - start] = buf[start:end]
        end -= start
        start = 0
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

    names = ["raw_pipelined", "raw_python", "raw_asyncio", "mp_unix", "acall", "acall_async_method"]
    if not args.no_threads:
        names += ["mp_threads", "threads"]
    secs: dict = {k: [] for k in names}
    with RawServer("threads") as raw, RawServer("threads", unix=True) as raw_unix, \
            _mp.MPServer("unix") as mp, bm.start(bm.Local()) as b, \
            concurrent.futures.ThreadPoolExecutor(w) as pool:
        m, = b.start(1, services={"Echo": Echo()})
        sock = raw.connect(b"PIPE")
        usock = raw_unix.connect(b"ECHO")
        mp_conn = mp.connect()
        raw_pipelined(sock, n // 10, w)  # warm up
        raw_python(usock, n // 10, w)
        _mp.pipelined(mp_conn, n // 10, w)
        acalls(m, "Echo.echo", n // 10, w)
        for _ in range(args.rounds):
            secs["raw_pipelined"].append(raw_pipelined(sock, n, w))
            secs["raw_python"].append(raw_python(usock, n, w))
            secs["raw_asyncio"].append(raw_asyncio(raw.port, n, w))
            secs["mp_unix"].append(_mp.pipelined(mp_conn, n, w))
            secs["acall"].append(acalls(m, "Echo.echo", n, w))
            secs["acall_async_method"].append(acalls(m, "Echo.aecho", n, w))
            if "threads" in secs:
                secs["mp_threads"].append(_mp.threads_behind_a_lock(pool, mp_conn, n, w))
                secs["threads"].append(thread_calls(pool, m, n, w))
        sock.close()
        usock.close()
        mp_conn.close()

    figures: dict = {}
    rates = {name: n / median(s) for name, s in secs.items()}
    print(f"\n{'':20} {'calls/s':>10} {'us/call':>9} {'x raw_python':>13} {'x mp_unix':>10} {'raw_pipelined / x':>18}")
    for name, s in secs.items():
        rate = rates[name]
        figures[name] = {"calls_per_s": rate, "us_per_call": 1e6 / rate,
                         "ratio_to_raw_python": rate / rates["raw_python"],
                         "ratio_to_mp_unix": rate / rates["mp_unix"],
                         "raw_pipelined_over_this": rates["raw_pipelined"] / rate, "rounds_s": s}
        print(f"{name:20} {rate:10.0f} {1e6 / rate:9.1f} {rate / rates['raw_python']:13.2f} "
              f"{rate / rates['mp_unix']:10.2f} {rates['raw_pipelined'] / rate:18.1f}")
    acall = figures["acall"]
    print(f"\nacall / raw_python = {acall['ratio_to_raw_python']:.2f} (target >= 0.4); "
          f"acall / mp_unix = {acall['ratio_to_mp_unix']:.2f} (target >= 1)")
    write_json(path, {"benchmark": "calls", "implementation": info, "calls": n, "inflight": w,
                      "rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
