"""Sampling CPU profiles and allocation sites, and the merged Profile of a cluster.

The sampler reads every thread's stack with ``sys._current_frames()`` about
100 times a second: no ptrace, no extra binary, in any process. Samples of a
thread blocked in a known wait (an idle pool worker, a connection's reader, an
event loop in select) are left out, so the profile shows work. Frames are
named ``qualname (file.py:first line)``, so a function's samples add up.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

from .errors import Error

HZ = 100.0
# Leaf frames (file, function) where a thread waits rather than works.
IDLE = frozenset({
    ("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"),
    ("selectors.py", "select"), ("queue.py", "get"), ("socket.py", "accept"),
    ("thread.py", "_worker"),
    ("_pool.py", "_work"), ("_role.py", "_read_once"), ("_reader.py", "_run"),
    ("_standby.py", "_run"), ("_worker.py", "_watch_parent"),
    ("local.py", "_pump"), ("local.py", "_reap_group"), ("_profile.py", "sample"),
})

# Threads waiting in compiled code, which leaves no frame to know the wait by
# (the connection core is compiled, see setup.py): a reader's blocking receive
# (_sockio adds it), a caller waiting for its reply (_waiters.Waiter.get), a
# reader thread waiting for the role, the standby's poll.
WAITING: set = set()


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """The calling thread waits meanwhile: its samples are left out."""
    me = threading.get_ident()
    WAITING.add(me)
    try:
        yield
    finally:
        WAITING.discard(me)


_labels: dict = {}  # code object -> frame label


def _label(code: Any) -> str:
    label = _labels.get(code)
    if label is None:
        name = getattr(code, "co_qualname", code.co_name)
        where = os.path.basename(code.co_filename)
        label = _labels[code] = f"{name} ({where}:{code.co_firstlineno})".replace(";", ":")
    return label


def _idle(code: Any) -> bool:
    return (os.path.basename(code.co_filename), code.co_name) in IDLE


def sample(seconds: float, hz: float = HZ) -> list[tuple[tuple[str, ...], int]]:
    """Sample every other thread of this process for seconds; [(root-first stack, count)]."""
    if not 0 < seconds <= 3600 or not 0 < hz <= 1000:
        raise Error(f"cannot profile for {seconds!r} s at {hz!r} Hz: want 0-3600 s and 0-1000 Hz")
    me = threading.get_ident()
    counts: Counter = Counter()
    interval = 1.0 / hz
    tick = time.monotonic()
    end = tick + seconds
    while tick < end:
        for ident, frame in sys._current_frames().items():
            if ident == me or ident in WAITING or _idle(frame.f_code):
                continue
            stack = []
            while frame is not None:
                stack.append(_label(frame.f_code))
                frame = frame.f_back
            counts[tuple(reversed(stack))] += 1
        frame = None
        tick += interval
        time.sleep(max(0.0, tick - time.monotonic()))
    return list(counts.items())


def allocation_sites(seconds: float, top: int = 20) -> list[tuple[str, int, int]]:
    """Trace allocations for seconds; the top sites of what is still allocated.

    Returns [(file:line, bytes, blocks)]. tracemalloc runs only during the
    window (unless something else had already started it).
    """
    if not 0 < seconds <= 3600:
        raise Error(f"cannot trace allocations for {seconds!r} s: want 0-3600 s")
    _trace(+1)
    try:
        time.sleep(seconds)
        snapshot = tracemalloc.take_snapshot()
    finally:
        _trace(-1)
    stats = snapshot.statistics("lineno")[:top]
    return [(f"{s.traceback[0].filename}:{s.traceback[0].lineno}", s.size, s.count) for s in stats]


_tracing = {"users": 0, "ours": False}  # windows open in this process (InProcess machines share it)
_tracing_lock = threading.Lock()


def _trace(change: int) -> None:
    """Open (+1) or close (-1) a tracing window: tracemalloc runs while any is open,
    and is stopped after the last only if the first started it."""
    with _tracing_lock:
        if _tracing["users"] == 0 and change > 0:
            _tracing["ours"] = not tracemalloc.is_tracing()
            if _tracing["ours"]:
                tracemalloc.start()
        _tracing["users"] += change
        if _tracing["users"] == 0 and _tracing["ours"]:
            tracemalloc.stop()


class Profile:
    """Stack samples of several machines, merged: each stack starts with its machine's name.

    ``collapsed()`` is folded-stack text; ``top(n)`` a table by own and total
    samples; ``save(path)`` writes ``.folded`` (or ``.txt``) or ``.json``
    (speedscope). ``errors`` names machines that could not be profiled.
    """

    def __init__(self, samples: dict[tuple[str, ...], int], seconds: float = 0.0, hz: float = HZ,
                 errors: Optional[dict[str, str]] = None):
        self.samples = samples
        self.seconds = seconds
        self.hz = hz
        self.errors = errors or {}

    @classmethod
    def merge(cls, parts: dict[str, Iterable], seconds: float, hz: float = HZ,
              errors: Optional[dict[str, str]] = None) -> "Profile":
        """One Profile from {machine name: [(stack, count)]}."""
        samples: Counter = Counter()
        for name, stacks in parts.items():
            for stack, count in stacks:
                samples[(name,) + tuple(stack)] += count
        return cls(dict(samples), seconds, hz, errors)

    def __repr__(self) -> str:
        return f"<Profile {sum(self.samples.values())} samples of {', '.join(self.machines)}>"

    @property
    def machines(self) -> list[str]:
        return sorted({stack[0] for stack in self.samples}, key=lambda n: (len(n), n))

    def machine(self, name: str) -> "Profile":
        """The samples of one machine only."""
        return Profile({s: c for s, c in self.samples.items() if s[0] == name}, self.seconds, self.hz)

    def collapsed(self) -> str:
        """Folded stacks, ``machine;outer;...;inner count`` per line."""
        return "".join(f"{';'.join(stack)} {count}\n" for stack, count in sorted(self.samples.items()))

    def top(self, n: int = 20) -> str:
        """The n functions with the most own samples: own, total, and on which machines."""
        own: Counter = Counter()
        total: Counter = Counter()
        where: dict[str, Counter] = {}
        for stack, count in self.samples.items():
            own[stack[-1]] += count
            for frame in set(stack[1:]):
                total[frame] += count
                where.setdefault(frame, Counter())[stack[0]] += count
        everything = sum(self.samples.values()) or 1
        rows = [("own", "own%", "total", "total%", "function", "machines")]
        for frame, count in sorted(own.items(), key=lambda kv: (-kv[1], kv[0]))[:n]:
            machines = ", ".join(f"{m} {c}" for m, c in where[frame].most_common(4))
            rows.append((str(count), f"{100 * count / everything:.1f}", str(total[frame]),
                         f"{100 * total[frame] / everything:.1f}", frame, machines))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join([r[i].rjust(widths[i]) for i in range(4)] + [r[4], r[5]]).rstrip()
                         for r in rows)

    def to_speedscope(self) -> dict:
        """The speedscope file format: one sampled profile per machine."""
        frames: dict[str, int] = {}
        profiles = []
        for name in self.machines:
            stacks, weights = [], []
            for stack, count in sorted(self.samples.items()):
                if stack[0] == name:
                    stacks.append([frames.setdefault(f, len(frames)) for f in stack[1:]])
                    weights.append(count)
            profiles.append({"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                             "endValue": sum(weights), "samples": stacks, "weights": weights})
        return {"$schema": "https://www.speedscope.app/file-format-schema.json",
                "shared": {"frames": [{"name": f} for f in frames]},
                "profiles": profiles, "name": "bigmachine profile", "exporter": "bigmachine"}

    def save(self, path: str) -> None:
        """Write the profile: ``.json`` as speedscope, ``.folded``/``.txt`` as folded stacks."""
        if path.endswith(".json"):
            text = json.dumps(self.to_speedscope())
        elif path.endswith((".folded", ".txt")):
            text = self.collapsed()
        else:
            raise Error(f"cannot save a profile as {path!r}: use .folded, .txt or .json")
        with open(path, "w") as f:
            f.write(text)


class MemoryProfile:
    """Top allocation sites per machine: {name: [(file:line, bytes, blocks)]}."""

    def __init__(self, sites: dict[str, list], errors: Optional[dict[str, str]] = None):
        self.sites = sites
        self.errors = errors or {}

    def to_dict(self) -> dict:
        return {"sites": {name: [list(s) for s in sites] for name, sites in self.sites.items()},
                "errors": self.errors}

    def __str__(self) -> str:
        lines = []
        for name, sites in self.sites.items():
            lines.append(f"{name}:")
            lines += [f"  {size / 2**20:10.2f} MiB {count:9d} blocks  {site}" for site, size, count in sites]
        lines += [f"{name}: {err}" for name, err in self.errors.items()]
        return "\n".join(lines)
