"""bigmachine's scripts that run on a host under the host's own Python, and the
driver's side of the host's cache (remote/cache.py).

The scripts live in backends/remote/ as plain files (package data, not
modules of ours: the host has no bigmachine yet when they run) and are sent
as the argument of ``python -c``. Whatever carries them (an SSH exec channel,
an EC2 agent) is a `Run`: it runs an argv on the host, with bytes on its
stdin, by a deadline, and returns (exit status, stdout, stderr).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

from ..errors import Error
from ._bundle import Bundle

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
Run = Callable[[Sequence[str], bytes, float], "tuple[int, bytes, bytes]"]


@functools.lru_cache(maxsize=None)
def script(name: str) -> str:
    """The text of remote/<name>.py."""
    with open(os.path.join(REMOTE_DIR, name + ".py"), encoding="utf-8") as f:
        return f.read()


def indent(text: str, limit: int = 20) -> str:
    lines = text.splitlines()[-limit:]
    return "\n".join(f"  {line}" for line in lines)


class HostCache:
    """The cache at path (as the host's Python resolves it) on the host called label."""

    def __init__(self, label: str, run: Run, python: Sequence[str], path: str):
        self.label = label
        self.run = run
        self.python = list(python)
        self.path = path

    def entry(self, bundle: Bundle) -> str:
        return f"bundles/{bundle.hash}"

    def where(self, entry: str) -> str:
        """The path of an entry on the host."""
        return os.path.join(self.path, entry)

    def _call(self, ops: list[dict], deadline: float, stdin: bytes = b"") -> list[dict]:
        request = json.dumps({"cache": self.path, "ops": ops})
        status, out, err = self.run(self.python + ["-c", script("cache"), request], stdin,
                                    deadline)
        text = err.decode("utf-8", "replace").strip()
        if status != 0:
            raise Error(f"{self.label}: the bigmachine cache {self.path} (status {status}):\n"
                        f"{indent(text)}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def ship(self, bundles: Sequence[tuple[Bundle, dict]], deadline: float, keep: int,
             max_age: float, using: Sequence[str] = ()) -> list[tuple[Bundle, int]]:
        """Check the bundles the host holds, prune old entries (not these, nor the entries
        in using), send the bundles it lacks; return (bundle, bytes sent) for each sent.

        Each bundle comes with how to install it: {"build": "plain" | "check" |
        "build", "exts": [...]} (see remote/cache.py), {} for plain files.
        """
        entries = [self.entry(b) for b, _ in bundles]
        ops = [{"op": "check", "entries": entries},
               {"op": "prune", "keep": keep, "max_age": max_age, "using": entries + list(using)}]
        missing = set(self._call(ops, deadline)[0]["missing"])
        sent = []
        for bundle, how in bundles:
            if self.entry(bundle) not in missing:
                continue
            data = bundle.tar()
            self._call([{"op": "install", "entry": self.entry(bundle), "salt": bundle.salt,
                         "build": how.get("build", "plain"), "exts": how.get("exts", [])}],
                       deadline, stdin=data)
            sent.append((bundle, len(data)))
        return sent

    def env(self, key: str, wheels: Bundle, pip: Bundle, args: Sequence[str],
            deadline: float) -> dict:
        """The venv envs/<key> made from the wheels with pip and args (built when missing or
        damaged): {"python", "path" (its sys.path), "rebuilt" (why, or None), "seconds"}."""
        return self._call([{"op": "env", "entry": f"envs/{key}", "wheels": self.entry(wheels),
                            "pip": self.entry(pip), "args": list(args)}], deadline)[0]
