"""Bulk numpy transfers between processes, against a raw TCP socket.

    python -m bigmachine bench bulk [--sizes 1,64,512] [--runs 5] [--tls] [--json PATH]

For each size (MiB of float64) and direction, the median GB/s over runs:

- d2m: driver -> machine, ``m.call("Echo.nbytes", a)`` (the machine looks at
  the size and last element and replies);
- m2d: machine -> driver, ``m.call("Echo.make", n)`` returns an array the
  machine made earlier;
- m2m: machine A -> machine B: A calls ``bm.current().dial(B.addr).call(
  "Echo.nbytes", a)`` with an array it made; timed in A.

Baselines in the same run, against a raw child process with blocking sockets
moving the bytes in RAW_CHUNK (1 MiB) pieces: the receiver ``recv_into``s a
freshly allocated numpy array (raw_d2m: the
child receives; raw_m2d: this process receives). m2m is compared with raw_d2m
(one process's array into a fresh array in another process).

For the largest size the receiver's peak RSS growth during the runs is
reported (VmHWM reset through /proc/self/clear_refs before them): ~1x the
payload means the bytes landed in their final buffer without a copy.

With ``--tls`` bigmachine runs with ``bm.Local(tls=True)`` (d2m, m2d and m2m
are then over TLS), and a second raw child serves the same bytes over TLS 1.3
with mutual certificate verification (certificates from a
``bigmachine._tls.ClusterCA``, bigmachine's contexts; ``ssl.SSLSocket``, the
receiver decrypting into the fresh array): raw_tls_d2m and raw_tls_m2d. The
ratios are then to the raw TLS figures (m2m to raw_tls_d2m); the plain raw
figures stay in the line for reference.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
from typing import Optional

import bigmachine as bm

from ._common import (HEADER, RawServer, json_arg, median, print_header, recv_exact, send_all,
                      tls_description, write_json)
from ._echo import Echo
from ._memory import rss_peak, rss_reset

MiB = 1 << 20


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,64,512", help="MiB, comma separated")
    ap.add_argument("--runs", type=int, default=5, help="runs per size (small sizes get more)")
    ap.add_argument("--tls", action="store_true",
                    help="bigmachine with bm.Local(tls=True); adds a raw TLS 1.3 baseline")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    tls = args.tls
    info = print_header("bulk: float64 arrays between processes"
                        + (", bigmachine and raw over TLS 1.3" if tls else ""))
    figures: dict = {}
    rss: dict = {}
    # the raw baselines: name -> (sink, source) connections to its own child
    variants = ["raw"] + (["raw_tls"] if tls else [])
    baseline = variants[-1]  # what the ratios are to

    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(RawServer("threads", tls=name == "raw_tls"))
                   for name in variants}
        b = stack.enter_context(bm.start(bm.Local(tls=True) if tls else bm.Local()))
        ma, mb = b.start(2, services={"Echo": Echo()})
        links = {name: (srv.connect(b"SINK"), srv.connect(b"SRCE")) for name, srv in servers.items()}
        if tls:
            print(f"raw_tls: {tls_description(links['raw_tls'][0])}; bigmachine: bm.Local(tls=True)",
                  flush=True)
        reply = memoryview(bytearray(24))
        rhead = memoryview(bytearray(16))

        def raw_query_rss(sink) -> tuple:
            sink.sendall(HEADER.pack(3, 0, 0, 0, 0))
            buf = bytearray(32)
            recv_exact(sink, memoryview(buf))
            return int.from_bytes(buf[16:24], "little"), int.from_bytes(buf[24:32], "little")

        def raw_reset_rss(sink) -> None:
            sink.sendall(HEADER.pack(2, 0, 0, 0, 0))
            recv_exact(sink, memoryview(bytearray(16)))

        for mib in sizes:
            nbytes = mib * MiB
            n = nbytes // 8
            runs = max(args.runs, 50 if mib <= 1 else 10 if mib <= 64 else args.runs)
            largest = mib == max(sizes)
            a = np.arange(n, dtype=np.float64)
            last = float(n - 1)
            head = HEADER.pack(1, 0, 0, 1, nbytes)
            view = memoryview(a).cast("B")
            t: dict = {k: [] for k in ("d2m", "raw_d2m", "m2d", "raw_m2d", "m2m")}
            if tls:
                t.update({"raw_tls_d2m": [], "raw_tls_m2d": []})

            # ---- driver -> machine
            def bm_d2m() -> None:
                assert ma.call("Echo.nbytes", a) == (nbytes, last)

            def raw_d2m(sink) -> None:
                sink.sendall(head)
                send_all(sink, view)
                recv_exact(sink, reply)
                assert HEADER.unpack_from(reply)[4] == nbytes

            bm_d2m()  # warm up
            for sink, _ in links.values():
                raw_d2m(sink)
            if largest:
                base_bm, base_raw = ma.call("Echo.rss_reset"), {}
                for name, (sink, _) in links.items():
                    raw_reset_rss(sink)
                    _, base_raw[name] = raw_query_rss(sink)
            for _ in range(runs):
                for name, (sink, _) in links.items():
                    t[f"{name}_d2m"].append(timed(raw_d2m, sink))
                t["d2m"].append(timed(bm_d2m))
            if largest:
                peak, _ = ma.call("Echo.rss_peak")
                rss["d2m"] = peak - base_bm
                for name, (sink, _) in links.items():
                    peak, _ = raw_query_rss(sink)
                    rss[f"{name}_d2m"] = peak - base_raw[name]

            # ---- machine -> driver
            def bm_m2d() -> None:
                r = ma.call("Echo.make", n)
                assert r.nbytes == nbytes and r[-1] == last
                del r

            def raw_m2d(source) -> None:
                source.sendall(head)
                recv_exact(source, rhead)
                r = np.empty(n, dtype=np.float64)
                recv_exact(source, memoryview(r).cast("B"))
                assert r[-1] == last
                del r

            bm_m2d()  # the senders make their arrays now
            for _, source in links.values():
                raw_m2d(source)
            if largest:
                del view, a  # the driver now holds no big array of its own
                base = rss_reset()
            for _ in range(runs):
                for name, (_, source) in links.items():
                    t[f"{name}_m2d"].append(timed(raw_m2d, source))
                    if largest:
                        rss[f"{name}_m2d"] = max(rss.get(f"{name}_m2d", 0), rss_peak() - base)
                        base = rss_reset()
                t["m2d"].append(timed(bm_m2d))
                if largest:
                    rss["m2d"] = max(rss.get("m2d", 0), rss_peak() - base)
                    base = rss_reset()
            ma.call("Echo.drop")

            # ---- machine -> machine
            mb.call("Echo.nbytes", np.zeros(8))
            ma.call("Echo.push", mb.addr, n, 1)  # warm up; A makes its array
            if largest:
                base_b = mb.call("Echo.rss_reset")
            t["m2m"] = ma.call("Echo.push", mb.addr, n, runs)
            if largest:
                peak, _ = mb.call("Echo.rss_peak")
                rss["m2m"] = peak - base_b
            ma.call("Echo.drop")

            fig = {k: nbytes / median(v) / 1e9 for k, v in t.items()}

            def ratios(to: str) -> dict:
                return {"d2m": fig["d2m"] / fig[f"{to}_d2m"], "m2d": fig["m2d"] / fig[f"{to}_m2d"],
                        "m2m": fig["m2m"] / fig[f"{to}_d2m"]}

            figures[f"{mib}MiB"] = entry = {"gbps": fig, "runs": runs, "seconds": t, "ratio": ratios(baseline)}
            if not tls:
                print(f"{mib:5d} MiB x{runs:<3d}  GB/s  d2m {fig['d2m']:6.2f} (raw {fig['raw_d2m']:6.2f}, "
                      f"x{fig['d2m'] / fig['raw_d2m']:.2f})   m2d {fig['m2d']:6.2f} (raw {fig['raw_m2d']:6.2f}, "
                      f"x{fig['m2d'] / fig['raw_m2d']:.2f})   m2m {fig['m2m']:6.2f} (x{fig['m2m'] / fig['raw_d2m']:.2f} raw_d2m)",
                      flush=True)
                continue
            entry["ratio_baseline"] = "raw_tls"
            entry["ratio_to_plain_raw"] = plain = ratios("raw")
            print(f"\n{f'{mib:5d} MiB x{runs:<3d} GB/s':25} {'bigmachine-TLS':>15} {'raw-TLS':>8} {'x raw-TLS':>10}"
                  f" {'raw':>8} {'x raw':>7}")
            for k in ("d2m", "m2d", "m2m"):
                ref = "d2m" if k == "m2m" else k  # m2m is compared with the raw d2m
                label = f"{k} (vs raw d2m)" if k == "m2m" else k
                print(f"  {label:23} {fig[k]:15.2f} {fig[f'raw_tls_{ref}']:8.2f} {entry['ratio'][k]:10.2f} "
                      f"{fig[f'raw_{ref}']:8.2f} {plain[k]:7.2f}", flush=True)
        for sink, source in links.values():
            sink.close()
            source.close()

    if rss:
        mib = max(sizes)
        width = max(8, *map(len, rss))
        print(f"\npeak RSS growth of the receiver during the {mib} MiB runs (payload {mib} MiB):")
        for k, v in rss.items():
            print(f"  {k:{width}} {v / MiB:8.0f} MiB  ({v / (mib * MiB):.2f}x payload)")
        figures["receiver_peak_rss_growth_bytes"] = rss
    write_json(path, {"benchmark": "bulk", "implementation": info, "sizes_mib": sizes,
                      **({"tls": True} if tls else {}), "figures": figures})


if __name__ == "__main__":
    main()
