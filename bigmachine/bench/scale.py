"""Starting Local machines, forked from the template and fresh, against spawning Python.

    python -m bigmachine bench scale [--rounds 3] [--sizes 1,4,16,64] [--idle 5] [--json PATH]

Measures, in one run, rounds interleaved:

- baseline:     spawn ``python -c "import numpy; connect to a Unix socket"``
                until its first byte arrives (what a fresh worker cannot beat);
- template:     the same with what the template imports before it can fork
                (numpy, cloudpickle, bigmachine's machine side): the floor
                of first_call, which adds the fork, the machine's start and
                the call;
- first_call:   ``bm.start()`` + ``b.start(1)`` + the first ``m.call`` in a
                fresh driver process that has imported bigmachine and the
                service's module, as a program's first session (what the
                baseline, a fresh process too, compares with);
- later_call:   the same in the bench's own process: a later session of a
                process that has run sessions before (the driver's modules
                imported, its code warm);
- start N:      ``b.start(N)`` right after ``bm.start()``, until all are RUNNING,
                forked from the template; ``fresh N``: the same with an ``env=``
                that makes every machine a fresh interpreter (the path every
                machine took before the template: ``PYTHONHASHSEED=random``
                changes nothing else);
- fan-out:      with the largest N running, one ``acall`` to every machine at once
                (``asyncio.gather``), until all replied;
- idle:         the driver's CPU (% of one core) while the largest N machines idle
                for --idle seconds, and the machines' own, per machine;
- memory:       RSS and PSS (``/proc/PID/smaps_rollup``) of each idle machine
                after a call: median of the forked ones, and of fresh ones.

Prints medians over the rounds and first_call / baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import bigmachine as bm

from ._common import child_env, cpu_seconds, json_arg, median, print_header, write_json
from ._echo import Echo
from .._blas import LIMITS
from ..backends._template import FIRST_IMPORTS

FRESH = {"PYTHONHASHSEED": "random"}  # read at start-up, so never forked; the default value
SERVICES = {"Echo": Echo()}
# What the template runs before it can fork a machine (see backends._template.main).
TEMPLATE_WARMUP = f"import gc; gc.disable(); import {', '.join(FIRST_IMPORTS)}"


def baseline(imports: str = "import numpy", env: Optional[dict] = None) -> float:
    """Seconds to spawn a Python that runs imports (with env added to its
    environment) and connects to a Unix socket."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen(1)
            code = (f"{imports}; import socket, sys; s = socket.socket(socket.AF_UNIX); "
                    "s.connect(sys.argv[1]); s.sendall(b'x'); s.recv(1)")
            t = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-c", code, path], env={**child_env(), **(env or {})})
            conn, _ = server.accept()
            with conn:
                conn.recv(1)
                took = time.perf_counter() - t
                conn.sendall(b"y")
            child.wait(30)
    return took


_FIRST_CALL = """
import sys, time
import bigmachine as bm
from bigmachine.bench._echo import Echo
t = time.perf_counter()
with bm.start() as b:
    m, = b.start(1, services={"Echo": Echo()})
    m.call("Echo.echo", 1)
    took = time.perf_counter() - t
print(took)
"""


def first_call() -> float:
    """Seconds for bm.start(), b.start(1) and the first call in a fresh driver process."""
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=child_env(),
                          stdout=subprocess.PIPE, check=True, timeout=120)
    return float(done.stdout.split()[-1])


def later_call() -> float:
    """Seconds for bm.start(), b.start(1) and the first call in this process."""
    t = time.perf_counter()
    with bm.start() as b:
        m, = b.start(1, services=SERVICES)
        m.call("Echo.echo", 1)
        took = time.perf_counter() - t
    return took


def start(n: int, env: Optional[dict] = None) -> tuple[float, bm.B, list]:
    """Seconds for b.start(n) right after bm.start(); the session (open) and machines."""
    b = bm.start()
    try:
        t = time.perf_counter()
        machines = b.start(n, services=SERVICES, env=env)
        took = time.perf_counter() - t
    except BaseException:
        b.shutdown()
        raise
    return took, b, machines


def fan_out(machines: list, times: int = 10) -> list[float]:
    """Seconds of one acall to every machine at once, times times."""
    async def run() -> list[float]:
        out = []
        for _ in range(times + 1):
            t = time.perf_counter()
            await asyncio.gather(*(m.acall("Echo.echo", 1) for m in machines))
            out.append(time.perf_counter() - t)
        return out[1:]  # the first warms this loop's path

    return asyncio.run(run())


def idle_cpu(machines: list, seconds: float) -> tuple[float, float]:
    """Percent of one core the driver, and each machine on average, used in seconds idle."""
    pids = [m.process.local_pid() for m in machines]
    t0, me0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    theirs0 = sum(cpu_seconds(p) for p in pids)
    time.sleep(seconds)
    wall, me1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
    theirs = sum(cpu_seconds(p) for p in pids) - theirs0
    mine = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    return 100 * mine / wall, 100 * theirs / wall / len(pids)


def memory(machines: list) -> tuple[float, float]:
    """Median RSS and PSS (MiB) of the machines' processes."""
    rss, pss = [], []
    for m in machines:
        with open(f"/proc/{m.process.local_pid()}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f if "kB" in line}
        rss.append(fields["Rss"] / 1024)
        pss.append(fields["Pss"] / 1024)
    return median(rss), median(pss)


def main(argv: Optional[list] = None) -> None:
    path, argv = json_arg(argv)
    ap = argparse.ArgumentParser(prog="python -m bigmachine bench scale")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1,4,16,64", help="machine counts, comma-separated")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    info = print_header("scale: starting Local machines, forked from the template and fresh")
    rows: dict[str, list] = {"baseline": [], "template": [], "first_call": [], "later_call": []}
    for n in sizes:
        rows[f"start {n}"], rows[f"fresh {n}"] = [], []
    rows[f"fan-out {sizes[-1]}"] = []
    extra: dict[str, list] = {"driver idle %": [], "machine idle %": [], "forked rss": [],
                              "forked pss": [], "fresh rss": [], "fresh pss": []}
    for r in range(args.rounds):
        rows["baseline"].append(baseline())
        rows["template"].append(baseline(TEMPLATE_WARMUP, LIMITS))
        rows["first_call"].append(first_call())
        rows["later_call"].append(later_call())
        for n in sizes:
            for kind, env in (("start", None), ("fresh", FRESH)):
                took, b, machines = start(n, env)
                try:
                    rows[f"{kind} {n}"].append(took)
                    if n != sizes[-1]:
                        continue
                    for m in machines:
                        m.call("Echo.echo", 1)
                    rss, pss = memory(machines)
                    extra[f"{'forked' if env is None else 'fresh'} rss"].append(rss)
                    extra[f"{'forked' if env is None else 'fresh'} pss"].append(pss)
                    if env is None:
                        rows[f"fan-out {n}"] += fan_out(machines)
                        driver, machine = idle_cpu(machines, args.idle)
                        extra["driver idle %"].append(driver)
                        extra["machine idle %"].append(machine)
                finally:
                    b.shutdown()
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.0f} ms" for k, v in rows.items() if v), flush=True)
    figures: dict = {}
    base = median(rows["baseline"])
    print(f"\n{'':16} {'median ms':>10} {'x baseline':>11}")
    for name, vals in rows.items():
        med = median(vals) * 1e3
        figures[name] = {"median_ms": med, "ratio_to_baseline": med / 1e3 / base, "n": len(vals)}
        print(f"{name:16} {med:10.1f} {med / 1e3 / base:11.2f}")
    for name, vals in extra.items():
        figures[name] = median(vals)
        unit = "MiB" if "ss" in name else "% of a core"
        print(f"{name:16} {median(vals):10.1f} {unit}")
    ratios = [f / b for f, b in zip(rows["first_call"], rows["baseline"])]
    floors = [t / b for t, b in zip(rows["template"], rows["baseline"])]
    print(f"\nfirst_call / baseline: median of the rounds' ratios {median(ratios):.2f} "
          f"(target <= 1.2); the template's imports alone: {median(floors):.2f}")
    write_json(path, {"benchmark": "scale", "implementation": info, "rounds": args.rounds,
                      "sizes": sizes, "figures": figures, "samples": rows, "extra": extra})


if __name__ == "__main__":
    main()
