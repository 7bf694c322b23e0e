"""Test-only fault injection: drop or truncate outgoing messages at random.

Enabled by the environment variable BIGMACHINE_FAULTS, e.g.
``drop=0.005,truncate=0.01,seed=1`` (machines inherit it). The write
scheduler asks ``FAULTS.choose()`` once per message when it is set.
"""
from __future__ import annotations

import os
import random
from typing import Optional

DROP = "drop"          # the message is never written (its caller waits for its deadline)
TRUNCATE = "truncate"  # written in part, then the connection is cut, as when a peer dies mid-write


class FaultInjector:
    """Chooses, per message, whether to drop it, truncate it, or leave it alone.

    Its stream is seeded with seed + pid, again in each forked process: machines
    forked from one template would otherwise all make the same choices, and one
    early drop would then fail every machine's start.
    """

    def __init__(self, spec: str):
        fields = dict(part.split("=", 1) for part in spec.split(",") if part)
        self.drop = float(fields.get("drop", 0))
        self.truncate = float(fields.get("truncate", 0))
        self.seed = int(fields["seed"]) if "seed" in fields else None
        self.rng = random.Random()
        self.reseed()

    def reseed(self) -> None:
        """Seed from this process's pid (from the OS without a seed)."""
        self.rng.seed(None if self.seed is None else self.seed + os.getpid())

    def choose(self) -> str:
        """DROP, TRUNCATE, or "" for a message written as usual."""
        x = self.rng.random()
        if x < self.drop:
            return DROP
        if x < self.drop + self.truncate:
            return TRUNCATE
        return ""


def _from_environment() -> Optional[FaultInjector]:
    spec = os.environ.get("BIGMACHINE_FAULTS")
    return FaultInjector(spec) if spec else None


FAULTS = _from_environment()
if FAULTS is not None:
    os.register_at_fork(after_in_child=FAULTS.reseed)
