"""The thread pools of native libraries loaded in this process (OpenBLAS, OpenMP).

A fork server must fork from a single thread, so it starts with these pools
limited to one thread (LIMITS, in its environment before numpy loads them);
each machine forked from it then sets them back to the size a fresh
interpreter would have chosen from the machine's own environment. Other BLAS
builds (MKL, BLIS) are not handled here: loaded in a template, they stay at
one thread in its machines.
"""
from __future__ import annotations

import ctypes
import os
from typing import Mapping, Optional

# What the template's environment sets so that no library starts a pool in it.
LIMITS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The setter and getter of each library, by how its file is named (OpenBLAS
# ships its symbols with a prefix and suffix in numpy's and scipy's wheels).
_OPENBLAS = [(prefix + "set_num_threads" + suffix, prefix + "get_num_threads" + suffix)
             for prefix in ("openblas_", "scipy_openblas_") for suffix in ("", "64_")]
_LIBRARIES = {
    "openblas": (_OPENBLAS, ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")),
    "gomp": ([("omp_set_num_threads", "omp_get_max_threads")], ("OMP_NUM_THREADS",)),
    "libomp": ([("omp_set_num_threads", "omp_get_max_threads")], ("OMP_NUM_THREADS",)),
}


def _loaded() -> dict[str, str]:
    """The kind (a _LIBRARIES key) of each thread-pool library mapped in this process, by path."""
    found = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split(None, 5)[-1].strip()
            name = os.path.basename(path)
            for kind in _LIBRARIES:
                if kind in name and ".so" in name:
                    found[path] = kind
    return found


def _functions(path: str, kind: str) -> Optional[tuple]:
    lib = ctypes.CDLL(path)  # already mapped: this only finds its handle
    for setter, getter in _LIBRARIES[kind][0]:
        try:
            return getattr(lib, setter), getattr(lib, getter)
        except AttributeError:
            continue
    return None


def default_threads(kind: str, env: Mapping[str, str]) -> int:
    """The pool size a fresh interpreter with env would start kind's library with:
    the first positive count among its variables, else the CPUs this process may use."""
    for name in _LIBRARIES[kind][1]:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


def pools() -> dict[str, int]:
    """The thread count of each loaded thread-pool library, by its path."""
    out = {}
    for path, kind in _loaded().items():
        functions = _functions(path, kind)
        if functions is not None:
            out[path] = int(functions[1]())
    return out


def restore(env: Mapping[str, str]) -> None:
    """Size every loaded pool as a fresh interpreter with env would have."""
    for path, kind in _loaded().items():
        functions = _functions(path, kind)
        if functions is not None:
            functions[0](ctypes.c_int(default_threads(kind, env)))
