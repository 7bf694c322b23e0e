"""Sequential round trip of a tiny call, against a raw blocking TCP ping.

    python -m bigmachine bench ping [--rounds 5] [--calls 2000] [--tls] [--json PATH]

Measures, in one run and against child processes:

- raw:          blocking client -> blocking server, 16-byte header + 8 bytes echoed
                over loopback TCP (the limit for a TCP link);
- raw_unix:     the same over a Unix socket (the limit for bm.Local()'s links);
- mp_unix:      ``multiprocessing.connection`` over a Unix socket, pickled
                ``("Echo.echo", (1,), {})`` request and pickled reply, one thread per
                side (what a user could write in twenty lines; see _mp.py);
- raw_asyncio:  the same client -> a bare asyncio Protocol echo server
                (what an event loop costs on the serving side);
- call:         ``m.call("Echo.echo", 1)`` (sync method: thread pool on the machine);
- call_no_poll: the same in a second session started with ``busy_poll=0``:
                each reader sleeps at once instead of busy-polling its socket
                for up to 300 us first (what the polling buys, and costs);
- call_async_method: ``m.call("Echo.aecho", 1)`` (async method: runs on the
                machine's IO loop, no thread-pool hop);
- acall:        ``await m.acall("Echo.echo", 1)`` from ``asyncio.run``.

Each is timed per call; rounds are interleaved so that load from other
processes hits them alike. Prints median and p99 in microseconds and the
ratio of each median to raw_unix and to mp_unix (bm.Local() links are Unix
sockets), and to raw (TCP); and for mp_unix and bigmachine the CPU time per
call of both processes together (user + system; the server's in 10 ms ticks),
which busy-polling spends to save wake-ups.

With ``--tls`` bigmachine runs with ``bm.Local(tls=True)`` (the call rows are
then over TLS), and two more baselines run in the same rounds, over TLS 1.3
with mutual certificate verification (certificates from a
``bigmachine._tls.ClusterCA``, bigmachine's contexts):

- raw_tls:          the blocking client and server of raw, through ``ssl.SSLSocket``;
- raw_asyncio_tls:  the same client -> the asyncio echo server with ``ssl=``.

The plain raw rows stay, so that the cost of TLS itself is visible; an extra
column gives each median over raw_tls.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Callable, Optional

import bigmachine as bm

from . import _mp
from ._common import (HEADER, RawServer, cpu_seconds, json_arg, median, pct, print_header,
                      recv_exact, tls_description, write_json)
from ._echo import Echo


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


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tls", action="store_true",
                    help="bigmachine with bm.Local(tls=True); adds raw TLS 1.3 baselines")
    args = ap.parse_args(argv)
    tls = args.tls
    info = print_header("ping: sequential round trip of one small call"
                        + (", bigmachine and raw over TLS 1.3" if tls else ""))

    raws = ["raw", "raw_unix", "raw_asyncio"] + (["raw_tls", "raw_asyncio_tls"] if tls else [])
    kinds = {"raw": "threads", "raw_unix": "threads", "raw_asyncio": "asyncio",
             "raw_tls": "threads", "raw_asyncio_tls": "asyncio"}
    samples: dict = {k: [] for k in raws + ["mp_unix", "call", "call_no_poll", "call_async_method",
                                            "acall"]}
    cpu: dict = {k: 0.0 for k in ["mp_unix", "call", "call_no_poll", "call_async_method", "acall"]}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(RawServer(kinds[name], tls=name.endswith("_tls"),
                                                       unix=name == "raw_unix"))
                   for name in raws}
        mp_server = stack.enter_context(_mp.MPServer("unix"))
        mp_conn = mp_server.connect()
        b = stack.enter_context(bm.start(bm.Local(tls=True) if tls else bm.Local()))
        m, = b.start(1, services={"Echo": Echo()})
        b0 = stack.enter_context(bm.start(bm.Local(tls=True) if tls else bm.Local(), busy_poll=0))
        m0, = b0.start(1, services={"Echo": Echo()})
        pids = {"mp_unix": mp_server.proc.pid, "call": m.process.local_pid(),
                "call_no_poll": m0.process.local_pid()}
        pids["call_async_method"] = pids["acall"] = pids["call"]

        def timed(name: str, run: Callable[[], list]) -> None:
            """One round of name: its samples, and the CPU both its processes used."""
            t0 = time.process_time(), cpu_seconds(pids[name])
            samples[name] += run()
            cpu[name] += time.process_time() - t0[0] + cpu_seconds(pids[name]) - t0[1]

        socks = {name: srv.connect(b"ECHO") for name, srv in servers.items()}
        if tls:
            print(f"raw_tls: {tls_description(socks['raw_tls'])}; bigmachine: bm.Local(tls=True)")
        # warm up everything
        for sock in socks.values():
            raw_round(sock, 200)
        _mp.ping_round(mp_conn, 200)
        call_round(m, "Echo.echo", 200)
        call_round(m0, "Echo.echo", 200)
        call_round(m, "Echo.aecho", 200)
        acall_round(m, 200)
        for r in range(args.rounds):
            for name in raws:
                samples[name] += raw_round(socks[name], args.calls)
            timed("mp_unix", lambda: _mp.ping_round(mp_conn, args.calls))
            timed("call", lambda: call_round(m, "Echo.echo", args.calls))
            timed("call_no_poll", lambda: call_round(m0, "Echo.echo", args.calls))
            timed("call_async_method", lambda: call_round(m, "Echo.aecho", args.calls))
            timed("acall", lambda: acall_round(m, args.calls))
        for sock in socks.values():
            sock.close()
        mp_conn.close()

    figures: dict = {}
    meds = {name: median(vals) / 1e3 for name, vals in samples.items()}
    bases = ["raw", "raw_unix", "mp_unix"] + (["raw_tls"] if tls else [])
    print(f"\n{'':20} {'median us':>10} {'p99 us':>10}" + "".join(f" {'x ' + b:>10}" for b in bases)
          + f" {'cpu us':>10}")
    for name, vals in samples.items():
        us = [v / 1e3 for v in vals]
        med, p99 = meds[name], pct(us, 99)
        figures[name] = {"median_us": med, "p99_us": p99, "n": len(us),
                         **{f"ratio_to_{b}": med / meds[b] for b in bases}}
        cpu_us = ""
        if name in cpu:
            figures[name]["cpu_us_per_call"] = cpu[name] / len(vals) * 1e6
            cpu_us = f" {figures[name]['cpu_us_per_call']:10.1f}"
        print(f"{name:20} {med:10.1f} {p99:10.1f}" + "".join(f" {med / meds[b]:10.2f}" for b in bases)
              + cpu_us)
    call = figures["call"]
    if tls:
        print(f"\nratio call median (TLS) / raw_tls median = {call['ratio_to_raw_tls']:.2f}"
              f"   (/ plain raw median = {call['ratio_to_raw']:.2f};"
              f" raw_tls / raw = {figures['raw_tls']['ratio_to_raw']:.2f})")
    else:
        print(f"\nratio call median / raw_unix median = {call['ratio_to_raw_unix']:.2f};"
              f" / mp_unix median = {call['ratio_to_mp_unix']:.2f}")
    write_json(path, {"benchmark": "ping", "implementation": info, "rounds": args.rounds,
                      "calls_per_round": args.calls, **({"tls": True} if tls else {}),
                      "figures": figures})


if __name__ == "__main__":
    main()
