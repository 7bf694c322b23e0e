"""Items per second of a stream: a sync generator against an async one.

    python -m bigmachine bench streams [--rounds 5] [--items 20000] [--json PATH]

The issue's target: an async method is no slower per item than a sync one.
Measured in one run against one ``bm.Local()`` machine:

- stream / stream_async:   ``m.stream("Echo.count", n)`` and
                           ``m.stream("Echo.acount", n)`` (a generator run
                           in the machine's pool against an async generator
                           run on its loop), items/s;
- astream / astream_async: the same with ``m.astream`` from ``asyncio.run``.

Median over rounds, and each async row's ratio to its sync row.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from typing import Optional

import bigmachine as bm

from ._common import json_arg, median, print_header, write_json
from ._echo import Echo

def stream_secs(m: bm.Machine, method: str, n: int) -> float:
    t = time.perf_counter()
    got = sum(1 for _ in m.stream(method, n))
    assert got == n, got
    return time.perf_counter() - t


def astream_secs(m: bm.Machine, method: str, n: int) -> float:
    async def run() -> float:
        t = time.perf_counter()
        got = 0
        async for _ in m.astream(method, n):
            got += 1
        assert got == n, got
        return time.perf_counter() - t

    return asyncio.run(run())


# Each row: how the driver takes the stream, and which method makes it.
ROWS = {"stream": (stream_secs, "Echo.count"), "stream_async": (stream_secs, "Echo.acount"),
        "astream": (astream_secs, "Echo.count"), "astream_async": (astream_secs, "Echo.acount")}


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser(prog="python -m bigmachine bench streams")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--items", type=int, default=20_000)
    args = ap.parse_args(argv)
    info = print_header(f"streams: {args.items} small items per stream, sync against async generator")
    n = args.items
    secs: dict = {k: [] for k in ROWS}
    with bm.start(bm.Local()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        for run, method in ROWS.values():  # warm up
            run(m, method, n // 10)
        for _ in range(args.rounds):
            for name, (run, method) in ROWS.items():  # interleaved: the same load for each row
                secs[name].append(run(m, method, n))
    rates = {k: n / median(v) for k, v in secs.items()}
    print(f"\n{'':16} {'items/s':>10} {'us/item':>8} {'x sync':>7}")
    for name, rate in rates.items():
        sync = rates[name.removesuffix("_async")]
        print(f"{name:16} {rate:10.0f} {1e6 / rate:8.2f} {rate / sync:7.2f}")
    write_json(path, {"benchmark": "streams", "implementation": info, "items": n,
                      "rounds": args.rounds, "rates": rates})


if __name__ == "__main__":
    main()
