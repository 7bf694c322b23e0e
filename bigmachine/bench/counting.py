"""What per-method counting costs: ns per call on each side, and small calls with it on and off.

    python -m bigmachine bench counting [--pairs 3] [--calls 2000] [--json PATH]

- caller: ``_metrics.counted(counter, fn)`` against ``fn()`` (what a
  ``Machine.call`` adds), in ns per call;
- served: a counter's lookup, ``begin()`` and ``end()`` (what serving a call
  adds on the machine), in ns per call;
- then ``pairs`` interleaved pairs of runs of the ping and calls benchmarks,
  each in a fresh process, with ``BIGMACHINE_COUNTERS=0`` (off) and without
  (on), printing the medians of each side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from .. import _metrics
from ._common import json_arg, median, print_header, write_json

N = 200_000


def _best_ns(fn, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - t) / N)
    return best


def micro() -> dict:
    """ns per call of the counting paths, less the empty loop's own cost."""
    counters = _metrics.Counters()

    def nothing() -> None:
        return None

    def empty() -> None:
        for _ in range(N):
            pass

    def bare() -> None:
        for _ in range(N):
            nothing()

    def caller() -> None:
        for _ in range(N):
            _metrics.counted(counters("Echo.echo"), nothing)

    def served() -> None:
        for _ in range(N):
            counter = counters("Echo.echo")
            counter.end(counter.begin(), False)

    return {"caller_ns": _best_ns(caller) - _best_ns(bare), "served_ns": _best_ns(served) - _best_ns(empty)}


def run(bench: str, args: list, counting: bool) -> dict:
    """One run of another benchmark in a fresh process; its JSON figures."""
    env = dict(os.environ)
    env.pop("BIGMACHINE_COUNTERS", None)
    if not counting:
        env["BIGMACHINE_COUNTERS"] = "0"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", f"bigmachine.bench.{bench}", *args, "--json", out.name],
                       env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
        with open(out.name) as f:
            return json.load(f)["figures"]


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser(prog="python -m bigmachine bench counting")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    info = print_header("counting: per-method counters, their cost per call")
    figures: dict = micro()
    if not _metrics.ENABLED:
        print("note: BIGMACHINE_COUNTERS=0 is set; the paths above were timed anyway")
    print(f"\ncaller side: {figures['caller_ns']:.0f} ns per call; "
          f"served side: {figures['served_ns']:.0f} ns per call")

    runs: dict = {("ping", "call", "median_us"): {True: [], False: []},
                  ("calls", "acall", "us_per_call"): {True: [], False: []}}
    for _ in range(args.pairs):
        for counting in (True, False):
            ping = run("ping", ["--rounds", "1", "--calls", str(args.calls)], counting)
            calls = run("calls", ["--rounds", "1", "--calls", str(args.calls * 5), "--no-threads"],
                        counting)
            runs[("ping", "call", "median_us")][counting].append(ping["call"]["median_us"])
            runs[("calls", "acall", "us_per_call")][counting].append(calls["acall"]["us_per_call"])
    print(f"\n{args.pairs} interleaved pairs of fresh runs, medians:")
    print(f"{'':34} {'counting on':>12} {'off':>8} {'on - off':>9}")
    for (bench, row, unit), sides in runs.items():
        on, off = median(sides[True]), median(sides[False])
        figures[f"{bench}_{row}_{unit}"] = {"on": sides[True], "off": sides[False]}
        print(f"{bench + ' ' + row + ' (' + unit + ')':34} {on:12.1f} {off:8.1f} {on - off:9.1f}")
    write_json(path, {"benchmark": "counting", "implementation": info, "figures": figures})


if __name__ == "__main__":
    main()
