"""A parameter server: a server machine trains a model from its workers' gradient streams.

Each worker machine holds a shard of a linear-regression data set (made from
a seed). Its generator method `Worker.gradients` yields the gradient of the
loss on a minibatch, then waits for the weights the server sends back. The
server machine opens one stream per worker with `astream`, applies each
gradient as it arrives, and pushes the new weights to that worker with
`acall`. The driver only starts the machines and asks the server to train.

Two ways a stream ends early are shown:

- a timeout: one worker is a straggler that never answers; the server's
  per-item timeout (`astream(..., timeout=...)`) drops it, and that closes
  the generator on the worker;
- cancellation: once the loss is low enough the server cancels its tasks
  reading the other streams, and the workers' generators stop.

The weights are checked against np.linalg.lstsq on the same data in one process.

    python -m bigmachine.examples.parameter_server --workers 3 --features 100
    python -m bigmachine.examples.parameter_server --system ssh --hosts a,b --machines-per-host 2

Options: --workers (worker machines; one more machine is the server),
--features, --item-timeout (seconds the server waits for a worker's next
gradient), and --system ssh --hosts h1,h2 [--machines-per-host N].
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import threading
import time
from typing import Iterator

import numpy as np

import bigmachine as bm
from bigmachine.examples import add_system_arguments, system_from

ROWS = 10_000       # rows of data per worker
BATCH = 256
NOISE = 0.1
LEARNING_RATE = 0.1
TARGET_LOSS = 0.01  # the noise alone gives NOISE**2 / 2 = 0.005
MAX_STEPS = 20_000


def make_shard(seed: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows x and targets y = x @ w_true + noise; w_true is the same for every seed."""
    w_true = np.random.default_rng(0).normal(size=features)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, features))
    return x, x @ w_true + NOISE * rng.normal(size=ROWS)


@bm.service
class Worker:
    """Holds a shard; computes gradients for the weights the server last sent."""

    def init(self, machine: bm.Machine) -> None:
        # Here rather than in __init__, which runs in the driver: locks cannot be shipped.
        self.changed = threading.Condition()
        self.version = -1
        self.weights = np.empty(0)
        self.ended = threading.Event()
        self.how = ""

    def load(self, seed: int, features: int, straggler: bool = False) -> None:
        self.x, self.y = make_shard(seed, features)
        self.rng = np.random.default_rng(seed)
        self.straggler = straggler

    def set_weights(self, version: int, weights: np.ndarray) -> None:
        with self.changed:
            self.version, self.weights = version, weights
            self.changed.notify_all()

    def gradients(self) -> Iterator[tuple[np.ndarray, float]]:
        """For each new version of the weights, yield (gradient, loss) on a minibatch."""
        try:
            while not bm.cancelled():
                if self.straggler:
                    time.sleep(0.01)  # it never answers, but notices when its caller gives up
                    continue
                seen = self.version
                rows = self.rng.integers(0, len(self.y), BATCH)
                error = self.x[rows] @ self.weights - self.y[rows]
                yield self.x[rows].T @ error / BATCH, float(error @ error) / (2 * BATCH)
                with self.changed:
                    # bm.cancelled() is polled: a cancel does not notify our condition.
                    while self.version == seen and not bm.cancelled():
                        self.changed.wait(0.05)
        finally:
            self.how = "cancelled" if bm.cancelled() else "finished"
            self.ended.set()

    def how_ended(self, timeout: float) -> str:
        """Wait up to timeout seconds for the stream to end; say how it ended ("" if it has not)."""
        self.ended.wait(timeout)
        return self.how


@dataclasses.dataclass
class Training:
    weights: np.ndarray
    steps: int            # gradients applied
    loss: float           # mean minibatch loss of the last round
    dropped: list[int]    # workers whose stream timed out
    seconds: float


@bm.service
class Server:
    """Trains by pulling gradients from workers' streams and pushing weights back."""

    async def train(self, workers: list[bm.Machine], features: int,
                    item_timeout: float) -> Training:
        start = time.monotonic()
        weights = np.zeros(features)
        await asyncio.gather(*(w.acall("Worker.set_weights", 0, weights, timeout=item_timeout)
                               for w in workers))
        arrived: asyncio.Queue = asyncio.Queue()

        async def pull(i: int) -> None:
            try:
                async for gradient, loss in workers[i].astream("Worker.gradients",
                                                               timeout=item_timeout):
                    await arrived.put((i, gradient, loss))
                raise bm.Error(f"worker {i} ended its stream")
            except Exception as exc:  # TimeoutError drops the worker; anything else ends training
                await arrived.put((i, exc, None))

        readers = [asyncio.create_task(pull(i)) for i in range(len(workers))]
        steps, dropped, heard, recent = 0, [], set(), [float("inf")] * len(workers)
        try:
            while steps < MAX_STEPS and len(dropped) < len(workers):
                i, gradient, loss = await arrived.get()
                heard.add(i)
                if isinstance(gradient, TimeoutError):
                    dropped.append(i)
                    continue
                if isinstance(gradient, Exception):
                    raise gradient
                weights = weights - LEARNING_RATE * gradient
                steps += 1
                recent[steps % len(recent)] = loss
                await workers[i].acall("Worker.set_weights", steps, weights, timeout=item_timeout)
                # Until every worker has answered or timed out, a silent one
                # could be slow rather than stuck: wait for it to be decided.
                if len(heard) == len(workers) and np.mean(recent) < TARGET_LOSS:
                    break
        finally:
            for task in readers:
                task.cancel()  # cancels the streams still open: their generators stop
            await asyncio.gather(*readers, return_exceptions=True)
        return Training(weights, steps, float(np.mean(recent)), dropped, time.monotonic() - start)


@dataclasses.dataclass
class Result:
    training: Training
    workers: int
    endings: list[str]   # how each worker's stream ended, as the worker saw it
    error: float         # |weights - lstsq| / |lstsq| on the data of the workers that trained


def run(b: bm.B, workers: int, features: int, item_timeout: float, seed: int = 1) -> Result:
    """Train with worker 0 a straggler; check the weights against np.linalg.lstsq."""
    server, = b.start(1, services={"Server": Server()})
    pool = b.start(workers, services={"Worker": Worker()})
    for i, w in enumerate(pool):
        w.call("Worker.load", seed + i, features, straggler=(i == 0), timeout=60)
    training = server.call("Server.train", pool, features, item_timeout,
                           timeout=600)
    endings = [w.call("Worker.how_ended", 10.0, timeout=30) for w in pool]
    shards = [make_shard(seed + i, features) for i in range(workers) if i not in training.dropped]
    x = np.concatenate([s[0] for s in shards])
    y = np.concatenate([s[1] for s in shards])
    best = np.linalg.lstsq(x, y, rcond=None)[0]
    error = float(np.linalg.norm(training.weights - best) / np.linalg.norm(best))
    return Result(training, workers, endings, error)


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3,
                        help="worker machines, the first a straggler (default 3; at least 2)")
    parser.add_argument("--features", type=int, default=100, help="model size (default 100)")
    parser.add_argument("--item-timeout", type=float, default=1.0,
                        help="seconds the server waits for a worker's next gradient (default 1)")
    add_system_arguments(parser)
    args = parser.parse_args(argv)
    if args.workers < 2 or args.features < 1 or args.item_timeout <= 0:
        parser.error("--workers must be at least 2, --features and --item-timeout positive")
    with bm.start(system_from(parser, args)) as b:
        r = run(b, args.workers, args.features, args.item_timeout)
    t = r.training
    print(f"trained {args.features} weights in {t.seconds:.2f} s: {t.steps:,} gradients pulled "
          f"from {r.workers - len(t.dropped)} workers' streams, new weights pushed after each; "
          f"loss {t.loss:.4f}")
    print(f"dropped by the {args.item_timeout:g} s item timeout: workers {t.dropped}; "
          f"the others' streams were cancelled when the loss reached {TARGET_LOSS}")
    print(f"how each worker's generator ended: {', '.join(r.endings)}")
    print(f"the weights differ from np.linalg.lstsq on the same data by {100 * r.error:.2f}%")
    return r


if __name__ == "__main__":
    main()
