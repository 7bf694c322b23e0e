"""Estimate pi on a cluster of machines: a port of bigmachine's bigpi.

Each machine throws random darts at the unit square and streams back, batch
by batch, how many landed inside the quarter circle; the driver shows the
progress and combines the counts.

    python -m bigmachine.examples.pi --machines 4 --samples 100000000
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Iterator

import numpy as np

import bigmachine as bm

BATCH = 1_000_000


@bm.service
class Pi:
    """Samples points; its seed makes each machine's stream different."""

    def __init__(self, seed: int):
        self.seed = seed

    def init(self, machine: bm.Machine) -> None:
        self.rng = np.random.default_rng([self.seed, machine.addr.__hash__() & 0xFFFFFFFF])

    def sample(self, n: int) -> Iterator[tuple[int, int]]:
        """Yield (inside, total) for each batch of up to BATCH points."""
        while n > 0:
            k = min(n, BATCH)
            x = self.rng.random(k)
            y = self.rng.random(k)
            yield int(np.count_nonzero(x * x + y * y <= 1.0)), k
            n -= k


def estimate(b: bm.B, machines: int, samples: int, progress: bool = True) -> float:
    """Run the estimate on `machines` new machines of session b."""
    started = b.start(machines, services={"Pi": Pi(seed=int(time.time()))})
    shares = [samples // machines + (i < samples % machines) for i in range(machines)]
    inside = [0] * machines
    done = [0] * machines

    def run(i: int) -> None:
        for hit, k in started[i].stream("Pi.sample", shares[i], timeout=60):
            inside[i] += hit
            done[i] += k

    threads = [threading.Thread(target=run, args=(i,)) for i in range(machines)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if progress:
            sys.stderr.write(f"\r{sum(done):,}/{samples:,} samples ({100 * sum(done) / samples:.0f}%)")
            sys.stderr.flush()
        for t in threads:
            t.join(0.2)
    if progress:
        sys.stderr.write("\n")
    if sum(done) != samples:
        raise bm.Error(f"only {sum(done)} of {samples} samples came back")
    return 4.0 * sum(inside) / samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=4, help="machines to start (default 4)")
    parser.add_argument("--samples", type=int, default=100_000_000, help="points to sample")
    args = parser.parse_args(argv)
    if args.machines < 1 or args.samples < 1:
        parser.error("--machines and --samples must be positive")
    start = time.monotonic()
    with bm.start() as b:
        pi = estimate(b, args.machines, args.samples)
    elapsed = time.monotonic() - start
    print(f"pi ≈ {pi:.6f} (error {abs(pi - np.pi):.2e}) from {args.samples:,} samples "
          f"on {args.machines} machines in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
