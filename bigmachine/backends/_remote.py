"""bigmachine's scripts that run on a host under the host's own Python.

They live in backends/remote/ as plain files (package data, not modules of
ours: the host has no bigmachine yet when they run) and are sent as the
argument of ``python -c``.
"""
from __future__ import annotations

import functools
import os

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")


@functools.lru_cache(maxsize=None)
def script(name: str) -> str:
    """The text of remote/<name>.py."""
    with open(os.path.join(REMOTE_DIR, name + ".py"), encoding="utf-8") as f:
        return f.read()
