"""A sharded key-value store: an actor per machine, keys routed by hash.

Machine i runs a Shard holding the keys of shard i and a copy of shard i-1,
so every key lives on two machines. The client (the driver) keeps many
requests in flight with acall. Midway through a run of updates one machine
is stopped: reads go to the other copy, writes land on the copy that is
left, and a new machine rebuilds the lost shards by pulling its neighbours'
copies machine to machine. At the end every copy on every machine is
checked against a plain dict the client kept.

    python -m bigmachine.examples.kvstore --machines 4 --keys 10000 --inflight 64
    python -m bigmachine.examples.kvstore --system ssh --hosts a,b,c --machines 3

Options: --machines (at least 2), --keys, --inflight (requests in flight at
once), and --system ssh --hosts h1,h2 [--machines-per-host N] to run on SSH
hosts instead of local processes (a host needs a free slot for the new machine).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
import zlib
from typing import Awaitable, Callable

import bigmachine as bm
from bigmachine.examples import add_system_arguments, system_from

CALL_TIMEOUT = 30.0  # seconds; no request may hang the client


@bm.service
class Shard:
    """Key-value pairs by shard number: on machine i, shard i and the copy of shard i-1."""

    def __init__(self) -> None:
        self.shards: dict[int, dict[str, bytes]] = {}

    # Async methods run on the machine's event loop: for work this small that
    # is cheaper than a hop to the thread pool.
    async def put(self, shard: int, key: str, value: bytes) -> None:
        self.shards.setdefault(shard, {})[key] = value

    async def get(self, shard: int, key: str) -> bytes:
        return self.shards[shard][key]

    async def copy_of(self, shard: int) -> dict[str, bytes]:
        return self.shards.get(shard, {})

    async def rebuild(self, shard: int, predecessor: bm.Machine, successor: bm.Machine,
                      machines: int) -> int:
        """Become machine `shard` of the ring: fetch its shards from the neighbours.

        The successor holds the copy of shard `shard`; the predecessor holds
        shard `shard - 1` itself. Returns the number of keys fetched.
        """
        before = (shard - 1) % machines
        own, copy = await asyncio.gather(
            successor.acall("Shard.copy_of", shard, timeout=CALL_TIMEOUT),
            predecessor.acall("Shard.copy_of", before, timeout=CALL_TIMEOUT))
        self.shards = {shard: own, before: copy}
        return len(own) + len(copy)


def shard_of(key: str, machines: int) -> int:
    # Not hash(): Python salts the hash of a str differently in every process.
    return zlib.crc32(key.encode()) % machines


async def for_each(keys: list[str], inflight: int, op: Callable[[str], Awaitable[None]]) -> None:
    """Await op(key) for every key, with `inflight` of them under way at all times."""
    todo = iter(keys)

    async def worker() -> None:
        for key in todo:
            await op(key)

    await asyncio.gather(*(worker() for _ in range(inflight)))


class Client:
    """Routes each key to the two machines holding it."""

    def __init__(self, ring: list[bm.Machine]):
        self.ring = ring  # ring[i] holds shard i and the copy of shard i-1
        self.lost_calls = 0  # calls that failed with MachineLost

    def holders(self, key: str) -> tuple[int, list[bm.Machine]]:
        shard = shard_of(key, len(self.ring))
        return shard, [self.ring[shard], self.ring[(shard + 1) % len(self.ring)]]

    async def put(self, key: str, value: bytes) -> None:
        """Write both copies; one lost machine is tolerated, since the other copy took it.

        A put that failed with MachineLost may or may not have run there (calls
        run at most once); rewriting a value is harmless, so nothing is undone.
        """
        shard, machines = self.holders(key)
        results = await asyncio.gather(
            *(m.acall("Shard.put", shard, key, value, timeout=CALL_TIMEOUT) for m in machines),
            return_exceptions=True)
        lost = [r for r in results if isinstance(r, bm.MachineLost)]
        self.lost_calls += len(lost)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, bm.MachineLost):
                raise r
        if len(lost) == len(results):
            raise bm.Error(f"both machines holding {key!r} are lost") from lost[0]

    async def get(self, key: str) -> bytes:
        """Read the first copy, or the second if the first machine is lost."""
        shard, machines = self.holders(key)
        for m in machines:
            try:
                return await m.acall("Shard.get", shard, key, timeout=CALL_TIMEOUT)
            except bm.MachineLost as exc:
                self.lost_calls += 1
                last = exc
        raise bm.Error(f"both machines holding {key!r} are lost") from last


@dataclasses.dataclass
class Result:
    machines: int
    keys: int
    load_seconds: float   # putting every key once, with both copies
    stopped: str          # the name of the machine stopped mid-run
    lost_calls: int       # calls that met the stopped machine and went on to the other copy
    replacement: str
    rebuilt_keys: int     # keys the replacement pulled from its neighbours

    @property
    def puts_per_second(self) -> float:
        return self.keys / self.load_seconds


def stop(machine: bm.Machine, timeout: float = 30.0) -> None:
    """Stop one machine: it ends, and calls to it fail with MachineLost."""
    machine.shutdown(timeout=timeout)


async def update_all(client: Client, keys: list[str], inflight: int,
                     expected: dict[str, bytes], victim: bm.Machine) -> None:
    """Write a new value to every key and read it back; stop victim halfway through."""
    async def update(key: str) -> None:
        value = f"{key}:v2".encode()
        await client.put(key, value)
        expected[key] = value
        if await client.get(key) != value:
            raise bm.Error(f"{key!r} did not read back as written")

    half = len(keys) // 2
    await for_each(keys[:half], inflight, update)
    # The second half runs while the victim stops: calls in flight on it fail
    # with MachineLost, and once it is STOPPED calls to it fail at once.
    await asyncio.gather(asyncio.to_thread(stop, victim), for_each(keys[half:], inflight, update))


def check(ring: list[bm.Machine], expected: dict[str, bytes]) -> None:
    """Both copies of every shard, on every machine, equal what the client wrote."""
    n = len(ring)
    for shard in range(n):
        want = {k: v for k, v in expected.items() if shard_of(k, n) == shard}
        for m in (ring[shard], ring[(shard + 1) % n]):
            got = m.call("Shard.copy_of", shard, timeout=CALL_TIMEOUT)
            if got != want:
                raise bm.Error(f"shard {shard} on {m.name} has {len(got)} keys, differing from "
                               f"the {len(want)} the client wrote")


def run(b: bm.B, machines: int, keys: int, inflight: int) -> Result:
    """Load, update (losing a machine halfway), rebuild, and check the store."""
    if machines < 2:
        raise bm.Error("a store with copies on two machines needs at least 2 machines")
    ring = b.start(machines, services={"Shard": Shard()})
    expected = {f"key{i}": f"key{i}:v1".encode() for i in range(keys)}
    lost = 1  # the machine to stop
    victim = ring[lost]

    async def workload() -> tuple[float, int]:
        client = Client(ring)
        start = time.monotonic()
        await for_each(list(expected), inflight, lambda k: client.put(k, expected[k]))
        load_seconds = time.monotonic() - start
        await update_all(client, list(expected), inflight, expected, victim)
        return load_seconds, client.lost_calls

    load_seconds, lost_calls = asyncio.run(workload())
    replacement, = b.start(1, services={"Shard": Shard()})
    rebuilt = replacement.call("Shard.rebuild", lost, ring[lost - 1], ring[(lost + 1) % machines],
                               machines, timeout=CALL_TIMEOUT)
    ring[lost] = replacement
    check(ring, expected)
    return Result(machines, keys, load_seconds, victim.name, lost_calls, replacement.name, rebuilt)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=4, help="machines to start (default 4)")
    parser.add_argument("--keys", type=int, default=10_000, help="keys to store (default 10,000)")
    parser.add_argument("--inflight", type=int, default=64,
                        help="requests in flight at once (default 64)")
    add_system_arguments(parser)
    args = parser.parse_args(argv)
    if args.machines < 2 or args.keys < 1 or args.inflight < 1:
        parser.error("--machines must be at least 2, --keys and --inflight positive")
    with bm.start(system_from(parser, args)) as b:
        result = run(b, args.machines, args.keys, args.inflight)
    print(f"loaded {result.keys:,} keys on {result.machines} machines, two copies each: "
          f"{result.puts_per_second:,.0f} puts/s with {args.inflight} requests in flight")
    print(f"updated and read back every key while {result.stopped} stopped halfway: "
          f"{result.lost_calls:,} calls met it and went on to the other copy")
    print(f"{result.replacement} rebuilt the lost shards from its neighbours' copies "
          f"({result.rebuilt_keys:,} keys); every copy matches the client's dict")
    return result


if __name__ == "__main__":
    main()
