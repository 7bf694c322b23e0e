"""A distributed sort: partitions travel machine to machine, never through the driver.

Each machine makes its partition of random float64 values from a seed (so
the driver can make the same data to check the result). Then a sample sort:

1. every machine sends the driver a small sample; the driver picks a
   splitter between each machine's range and the next;
2. every machine sorts its partition and cuts it at the splitters;
3. every machine sends bucket j straight to machine j: the driver hands each
   machine the list of Machine handles, and the bytes go from one machine's
   array to the other's socket (the exchange, timed for the GB/s figure once
   the machines have connected to each other);
4. every machine merges what it received: machine j holds the j-th range
   of the sorted whole.

The driver then fetches the result, compares it with np.sort of the same data
in one process, and prints both times and the exchange's GB/s.

    python -m bigmachine.examples.shuffle --machines 4 --elements 16777216
    python -m bigmachine.examples.shuffle --system ssh --hosts a,b --machines 2

Options: --machines, --elements (float64 values in all; 8 bytes each), and
--system ssh --hosts h1,h2 [--machines-per-host N] to run on SSH hosts.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time

import numpy as np

import bigmachine as bm
from bigmachine.examples import add_system_arguments, system_from

SAMPLE = 1000        # values per machine the splitters are chosen from
CALL_TIMEOUT = 300.0


def make_partition(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).random(size)


@bm.service
class Sorter:
    """One machine's part of the sort."""

    def __init__(self) -> None:
        self.part = np.empty(0)
        self.buckets: list[np.ndarray] = []
        self.received: dict[int, np.ndarray] = {}

    def generate(self, seed: int, size: int) -> None:
        self.part = make_partition(seed, size)
        self.received = {}

    def sample(self, k: int) -> np.ndarray:
        return self.part[np.random.default_rng(k).integers(0, len(self.part), k)]

    def split(self, splitters: np.ndarray) -> None:
        """Sort the partition and cut it into one bucket per machine (views, not copies)."""
        self.part.sort()
        self.buckets = np.split(self.part, np.searchsorted(self.part, splitters))

    async def connect(self, index: int, machines: list[bm.Machine]) -> None:
        """Open the connections to the other machines, so that send's time is the transfer's."""
        await asyncio.gather(*(m.acall("Supervisor.ping", timeout=CALL_TIMEOUT)
                               for j, m in enumerate(machines) if j != index))

    async def send(self, index: int, machines: list[bm.Machine]) -> int:
        """Send bucket j to machines[j], all at once; keep our own. Return the bytes sent."""
        self.received[index] = self.buckets[index]
        others = [j for j in range(len(machines)) if j != index]
        await asyncio.gather(*(machines[j].acall("Sorter.receive", index, self.buckets[j],
                                                 timeout=CALL_TIMEOUT) for j in others))
        return sum(self.buckets[j].nbytes for j in others)

    async def receive(self, source: int, bucket: np.ndarray) -> None:
        self.received[source] = bucket

    def merge(self) -> int:
        """Sort what arrived into this machine's range of the result; return its length."""
        self.part = np.sort(np.concatenate([self.received[j] for j in sorted(self.received)]))
        self.buckets, self.received = [], {}
        return len(self.part)

    def result(self) -> np.ndarray:
        return self.part


@dataclasses.dataclass
class Result:
    machines: int
    elements: int
    sort_seconds: float      # from sampling to merged, on the machines
    exchange_seconds: float
    exchanged_bytes: int     # bytes that went from one machine to another
    single_seconds: float    # np.sort of the same data in one process

    @property
    def exchange_gbps(self) -> float:
        return self.exchanged_bytes / self.exchange_seconds / 1e9


def run(b: bm.B, machines: int, elements: int, seed: int = 1) -> Result:
    """Sort `elements` random values on `machines` machines; check against np.sort."""
    ring = b.start(machines, services={"Sorter": Sorter()})
    sizes = [elements // machines + (i < elements % machines) for i in range(machines)]

    def each(method: str, *args_of: list) -> list:
        """Call method on every machine at once, with the i-th of each argument list."""
        async def calls() -> list:
            return await asyncio.gather(*(m.acall(method, *(a[i] for a in args_of),
                                                  timeout=CALL_TIMEOUT)
                                          for i, m in enumerate(ring)))
        return asyncio.run(calls())

    each("Sorter.generate", [seed + i for i in range(machines)], sizes)
    start = time.monotonic()
    samples = np.sort(np.concatenate(each("Sorter.sample", [SAMPLE] * machines)))
    splitters = samples[[len(samples) * j // machines for j in range(1, machines)]]
    each("Sorter.split", [splitters] * machines)
    each("Sorter.connect", list(range(machines)), [ring] * machines)
    exchange_start = time.monotonic()
    sent = each("Sorter.send", list(range(machines)), [ring] * machines)
    exchange_seconds = time.monotonic() - exchange_start
    lengths = each("Sorter.merge")
    sort_seconds = time.monotonic() - start

    # The check: the same data, sorted in one process. Fetching the result
    # through the driver is for this check only; the sort itself never did.
    data = np.concatenate([make_partition(seed + i, n) for i, n in enumerate(sizes)])
    single_start = time.monotonic()
    data.sort()
    single_seconds = time.monotonic() - single_start
    got = np.concatenate([m.call("Sorter.result", timeout=CALL_TIMEOUT) for m in ring])
    if sum(lengths) != elements or not np.array_equal(got, data):
        raise bm.Error("the distributed sort differs from np.sort")
    return Result(machines, elements, sort_seconds, exchange_seconds, sum(sent), single_seconds)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=4, help="machines to start (default 4)")
    parser.add_argument("--elements", type=int, default=1 << 24,
                        help="float64 values to sort (default 2**24: 128 MiB)")
    add_system_arguments(parser)
    args = parser.parse_args(argv)
    if args.machines < 1 or args.elements < 1:
        parser.error("--machines and --elements must be positive")
    with bm.start(system_from(parser, args)) as b:
        r = run(b, args.machines, args.elements)
    print(f"sorted {r.elements:,} float64 ({r.elements * 8 / 2**20:,.0f} MiB) on {r.machines} "
          f"machines in {r.sort_seconds:.2f} s; np.sort in one process took "
          f"{r.single_seconds:.2f} s; the results are equal")
    print(f"exchange: {r.exchanged_bytes / 2**20:,.1f} MiB machine to machine in "
          f"{r.exchange_seconds:.3f} s = {r.exchange_gbps:.2f} GB/s")
    return r


if __name__ == "__main__":
    main()
