"""Services for the SSH tests. The machines import this module from the
shipped bundle of the driver's working directory, so it imports nothing that
the remote venv lacks (no pytest)."""
from __future__ import annotations

import asyncio
import os
import sys

import bigmachine as bm


@bm.service
class Remote:
    def where(self) -> dict:
        import bigmachine

        return {
            "pid": os.getpid(),
            "executable": sys.executable,
            "prefix": sys.prefix,
            "bigmachine": bigmachine.__file__,
            "wire": bigmachine._wire.__file__,
            "decoder": bigmachine._decoder.__file__,
            "connection": bigmachine._connection.__file__,  # a .py that the build compiles
            "cwd": os.getcwd(),
            "tmpdir": os.environ.get("TMPDIR"),
            "path": list(sys.path),
            "argv": open(f"/proc/{os.getpid()}/cmdline", "rb").read().split(b"\0"),
            "environ": open(f"/proc/{os.getpid()}/environ", "rb").read(),
        }

    def echo(self, x):
        return x

    async def aecho(self, x):
        await asyncio.sleep(0)
        return x

    def count(self, n):
        yield from range(n)

    async def acount(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def total(self, a) -> float:
        return float(a.sum())

    def scale(self, a, k):
        return a * k

    def say(self, text: str) -> int:
        print(text, flush=True)
        print(f"{text} on stderr", file=sys.stderr, flush=True)
        return len(text)

    def relay(self, other: bm.Machine, x):
        """Call another machine from this one."""
        return other.call("Remote.echo", x, timeout=20)

    def fail(self, message: str):
        raise ValueError(message)
