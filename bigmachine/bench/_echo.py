"""The bigmachine service every benchmark runs on its machines.

A module of its own, importing only what the service uses: a machine imports
it when the service arrives, so it is part of every first call measured.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import bigmachine as bm

from ._memory import rss_now, rss_peak, rss_reset


@bm.service
class Echo:
    def __init__(self) -> None:
        self._arrays: dict = {}

    def echo(self, x: Any) -> Any:
        return x

    async def aecho(self, x: Any) -> Any:
        return x

    def count(self, n: int) -> Any:
        """A stream of n small items (a generator method)."""
        yield from range(n)

    async def acount(self, n: int) -> Any:
        """The same from an async generator (served on the machine's loop)."""
        for i in range(n):
            yield i

    def sum(self, a: Any) -> float:
        return float(a.sum())

    def nbytes(self, a: Any) -> tuple:
        """What a receiver must at least look at: size and the last element."""
        return a.nbytes, float(a[-1]) if len(a) else 0.0

    def _array(self, n: int) -> Any:
        a = self._arrays.get(n)
        if a is None:
            a = self._arrays[n] = np.arange(n, dtype=np.float64)  # pages touched
        return a

    def make(self, n: int) -> Any:
        return self._array(n)

    def drop(self) -> None:
        self._arrays.clear()

    def rss_reset(self) -> int:
        return rss_reset()

    def rss_peak(self) -> tuple:
        return rss_peak(), rss_now()

    def push(self, addr: str, n: int, runs: int) -> list:
        """Machine to machine: send our own array of n float64 to addr, runs times.

        Returns the seconds of each run, measured here (the sender).
        """
        a = self._array(n)
        peer = bm.current().dial(addr)
        peer.call("Echo.nbytes", a[:8])  # connect, warm up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            got, last = peer.call("Echo.nbytes", a)
            times.append(time.perf_counter() - t)
            assert got == a.nbytes and last == a[-1], (got, last)
        return times

    def pid(self) -> int:
        return os.getpid()
