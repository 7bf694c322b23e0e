"""The benchmarks, each against its raw-socket baseline in the same run.

Run one with ``python -m bigmachine bench NAME [options]`` (or
``python -m bigmachine.bench.NAME``); ``bench/NAME.py`` in a checkout runs the
same code. Every module has ``main(argv)``.
"""
from __future__ import annotations

# name -> what it measures, for `python -m bigmachine bench --help`
BENCHMARKS = {
    "ping": "sequential round trip of a tiny call, against raw sockets and multiprocessing.connection",
    "calls": "throughput of small calls with many in flight, against raw and multiprocessing.connection",
    "bulk": "large float64 arrays between driver and machines, against raw TCP into numpy",
    "ping_under_load": "ping latency while 512 MiB arrays share the connection",
    "counting": "what per-method counting costs per call, and small calls with it on and off",
    "scale": "starting 1-64 Local machines (forked and fresh), fan-out, idle CPU and memory, "
             "against spawning Python with numpy",
    "shm": "arrays between machines on one host (shared memory) against raw TCP, Unix and Ray",
    "peers": "ping and calls/s beside multiprocessing.connection, execnet, Pyro5, dask, ray",
    "streams": "items/s of a streamed sync generator against an async one",
    "instructions": "instructions per small call (callgrind), against multiprocessing.connection",
}
