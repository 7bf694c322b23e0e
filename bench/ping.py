"""Sequential round trip of a tiny call, against a raw blocking TCP ping.

    python bench/ping.py [--rounds 5] [--calls 2000] [--json PATH]

Measures, in one run and against child processes:

- raw:          blocking client -> blocking server, 16-byte header + 8 bytes echoed
                (the limit);
- raw_asyncio:  the same client -> a bare asyncio Protocol echo server
                (what an event loop costs on the serving side);
- call:         ``m.call("Echo.echo", 1)`` (sync method: thread pool on the machine);
- call_async_method: ``m.call("Echo.aecho", 1)`` (async method: runs on the
                machine's IO loop, no thread-pool hop);
- acall:        ``await m.acall("Echo.echo", 1)`` from ``asyncio.run``.

Each is timed per call; rounds are interleaved so that load from other
processes hits them alike. Prints median and p99 in microseconds and the
ratio of each median to the raw one.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bigmachine as bm  # noqa: E402

from _common import (HEADER, Echo, RawServer, json_arg, median, pct,  # noqa: E402
                     print_header, recv_exact, write_json)


def raw_round(sock, n: int) -> list:
    req = HEADER.pack(1, 0, 0, 1, 8) + (1).to_bytes(8, "little")
    buf = bytearray(24)
    view = memoryview(buf)
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        sock.sendall(req)
        recv_exact(sock, view)
        out.append(clock() - t)
    assert buf == req
    return out


def call_round(m, method: str, n: int) -> list:
    out = []
    clock = time.perf_counter_ns
    call = m.call
    for _ in range(n):
        t = clock()
        r = call(method, 1)
        out.append(clock() - t)
    assert r == 1
    return out


def acall_round(m, n: int) -> list:
    async def run() -> list:
        out = []
        clock = time.perf_counter_ns
        acall = m.acall
        await acall("Echo.echo", 1)  # warm this loop's path
        for _ in range(n):
            t = clock()
            r = await acall("Echo.echo", 1)
            out.append(clock() - t)
        assert r == 1
        return out

    return asyncio.run(run())


def main() -> None:
    path, argv = json_arg()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    info = print_header("ping: sequential round trip of one small call")

    samples: dict = {k: [] for k in ("raw", "raw_asyncio", "call", "call_async_method", "acall")}
    with RawServer("threads") as raw, RawServer("asyncio") as raw_aio, bm.start(bm.Local()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        s_raw = raw.connect(b"ECHO")
        s_aio = raw_aio.connect(b"ECHO")
        # warm up everything
        raw_round(s_raw, 200)
        raw_round(s_aio, 200)
        call_round(m, "Echo.echo", 200)
        call_round(m, "Echo.aecho", 200)
        acall_round(m, 200)
        for r in range(args.rounds):
            samples["raw"] += raw_round(s_raw, args.calls)
            samples["raw_asyncio"] += raw_round(s_aio, args.calls)
            samples["call"] += call_round(m, "Echo.echo", args.calls)
            samples["call_async_method"] += call_round(m, "Echo.aecho", args.calls)
            samples["acall"] += acall_round(m, args.calls)
        s_raw.close()
        s_aio.close()

    figures: dict = {}
    raw_med = median(samples["raw"]) / 1e3
    print(f"\n{'':20} {'median us':>10} {'p99 us':>10} {'x raw':>8}")
    for name, vals in samples.items():
        us = [v / 1e3 for v in vals]
        med, p99 = median(us), pct(us, 99)
        figures[name] = {"median_us": med, "p99_us": p99, "ratio_to_raw": med / raw_med, "n": len(us)}
        print(f"{name:20} {med:10.1f} {p99:10.1f} {med / raw_med:8.2f}")
    print(f"\nratio call median / raw median = {figures['call']['ratio_to_raw']:.2f}")
    write_json(path, {"benchmark": "ping", "implementation": info, "rounds": args.rounds,
                      "calls_per_round": args.calls, "figures": figures})


if __name__ == "__main__":
    main()
