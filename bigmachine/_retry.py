"""Retrying idempotent work across transport failures."""
from __future__ import annotations

import random
import time
from typing import Callable, Optional, TypeVar

from .errors import Error, MachineLost

T = TypeVar("T")


def retry(fn: Callable[[], T], *, retries: int = 3, base: float = 0.1, cap: float = 5.0,
          deadline: Optional[float] = None) -> T:
    """Call fn() and return its result, retrying it when the transport fails.

    Only the loss of the machine called is retried: a MachineLost raised here,
    not one that a remote method raised itself (that machine lost one of its
    own peers, and ran; it arrives with its remote traceback). A call that
    raised anything else ran and failed; retrying would not help. Retries go
    up to `retries` more times, sleeping a random time in
    [0, min(cap, base * 2**attempt)] before each (exponential backoff with
    full jitter). `deadline` (seconds) bounds the whole effort.
    Use it only for idempotent calls: a call that failed with MachineLost may
    have run. Fetch the handle inside fn so each attempt dials afresh::

        bm.retry(lambda: b.dial(addr).call("Store.get", key), retries=5)
    """
    if retries < 0:
        raise Error("retries must be >= 0")
    end = None if deadline is None else time.monotonic() + deadline
    for attempt in range(retries + 1):
        try:
            return fn()
        except MachineLost as exc:
            if attempt == retries or getattr(exc, "remote_traceback", None) is not None:
                raise
            pause = random.uniform(0, min(cap, base * (2 ** attempt)))
            if end is not None and time.monotonic() + pause >= end:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")
