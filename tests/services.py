"""Service classes for the tests, importable by machines as tests.services."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import bigmachine as bm


class CustomError(Exception):
    """An importable exception type: it comes back as itself."""


class BadInitError(Exception):
    """An exception whose custom __init__ breaks unpickling (cls(*args) fails)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")
        self.a, self.b = a, b


class UnprintableError(Exception):
    """An exception whose str() fails (a buggy __str__, as some extensions' errors have)."""

    def __str__(self):
        raise RuntimeError("this exception cannot be printed")


def _deep_helper_raises(msg):
    raise ValueError(msg)


@bm.service
class Echo:
    """The workhorse: replies, errors, slow and cancellable work, streams."""

    def __init__(self, tag="echo"):
        self.tag = tag
        self.init_calls = 0
        self.init_machine_addr = None
        self.events: dict = {}
        self.tasks_made = 0  # by the task factory use_task_factory sets

    def init(self, machine):
        self.init_calls += 1
        self.init_machine_addr = machine.addr

    # -- plain calls --
    def _private(self):
        return "private"

    def echo(self, x):
        return x

    def get_tag(self):
        return self.tag

    def busy_poll(self):
        """The busy-polling window of the caller's link on this side (None: it sleeps at once)."""
        from bigmachine._dispatch import calling_connection
        spin = calling_connection().reader.spin
        return None if spin is None else spin.window

    def combine(self, a, b=2, *rest, k=None, **kw):
        return {"a": a, "b": b, "rest": list(rest), "k": k, "kw": kw}

    def init_info(self):
        return self.init_calls, self.init_machine_addr

    def thread_name(self):
        return threading.current_thread().name

    async def aecho(self, x):
        return x

    async def afail(self, msg):
        raise CustomError(msg)  # before any await

    async def athread_name(self):
        asyncio.get_running_loop()  # raises unless on a loop
        return threading.current_thread().name

    async def atask(self):
        """The task this call runs in, as asyncio sees it before any await: its
        name, whether the loop lists it, and how many tasks a factory made."""
        task = asyncio.current_task()
        return task.get_name(), task in asyncio.all_tasks(), self.tasks_made

    async def acancel_self(self, first_step=True):
        """Cancel its own task (not its caller): in its first step or after an await."""
        if not first_step:
            await asyncio.sleep(0)
        asyncio.current_task().cancel()
        await asyncio.sleep(0)
        return "not reached"

    async def acount_then_cancel_self(self, n):
        """An async generator that yields n items, then cancels its own task."""
        for i in range(n):
            yield i
        asyncio.current_task().cancel()
        await asyncio.sleep(0)

    async def use_task_factory(self, on, fail=0, cancelled=False):
        """Set (or unset) a task factory on the machine's loop that counts its
        tasks; the first `fail` times it raises instead of making one (CustomError,
        or asyncio.CancelledError, a BaseException, if cancelled)."""
        def factory(loop, coro, **kwargs):
            self.tasks_made += 1
            if self.tasks_made <= fail:
                raise asyncio.CancelledError("no tasks today") if cancelled else CustomError("no tasks today")
            return asyncio.Task(coro, loop=loop, **kwargs)
        self.tasks_made = 0
        asyncio.get_running_loop().set_task_factory(factory if on else None)

    def environment(self):
        return {"executable": sys.executable, "cwd": os.getcwd(), "path": list(sys.path),
                "pid": os.getpid()}

    def say(self, out="", err="", tail=""):
        """Print lines to stdout and stderr, and maybe an unterminated tail."""
        if out:
            print(out)
        if err:
            print(err, file=sys.stderr)
        if tail:
            sys.stdout.write(tail)  # no newline and no flush: must still arrive
        return True

    # -- errors --
    def fail_value(self, msg):
        _deep_helper_raises(msg)

    def fail_custom(self, msg):
        raise CustomError(msg)

    def fail_bad_init(self):
        raise BadInitError("x", "y")

    def fail_unprintable(self):
        raise UnprintableError()

    async def afail_unprintable(self):
        raise UnprintableError()

    def fail_unprintable_midstream(self):
        yield 1
        raise UnprintableError()

    def blob(self, n):
        """n bytes: a reply much larger than its request."""
        return b"x" * n

    # -- timing, cancellation --
    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    async def asleep(self, seconds):
        await asyncio.sleep(seconds)
        return seconds

    async def ablock(self, key, seconds):
        """An async method that blocks the machine's loop (what it must not do)."""
        self.record(key, "blocking")
        time.sleep(seconds)
        return seconds

    def record(self, key, value):
        self.events[key] = value  # one dict store: atomic under the GIL

    def event(self, key):
        return self.events.get(key)

    def wait_cancel(self, key, limit=10.0):
        """Sync work that polls bigmachine.cancelled() and records what it saw."""
        self.record(key, "started")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if bm.cancelled():
                self.record(key, "cancelled")
                return "cancelled"
            time.sleep(0.01)
        self.record(key, "finished")
        return "finished"

    async def await_cancel(self, key, limit=10.0):
        self.record(key, "started")
        try:
            await asyncio.sleep(limit)
        except asyncio.CancelledError:
            self.record(key, "CancelledError")
            raise
        self.record(key, "finished")
        return "finished"

    # -- streams --
    def count(self, n):
        yield from range(n)

    async def acount(self, n):
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def forever(self, key):
        """An endless generator; its finally proves it was closed."""
        self.record(key, "running")
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            self.record(key, "closed")

    async def aforever(self, key):
        self.record(key, "running")
        i = 0
        try:
            while True:
                await asyncio.sleep(0.001)
                yield i
                i += 1
        finally:
            self.record(key, "closed")

    def stalled_stream(self, key):
        """Yields one item, then waits (polling bigmachine.cancelled()) for a second."""
        yield 0
        deadline = time.monotonic() + 10
        while not bm.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.record(key, "cancelled" if bm.cancelled() else "not cancelled")
        yield 1

    def fail_midstream(self, n):
        yield from range(n)
        raise CustomError(f"after {n}")


@bm.service
class Relay:
    """Calls other machines from inside a machine."""

    def via_addr(self, addr, method, *args):
        return bm.current().dial(addr).call(method, *args, timeout=10)

    def via_handle(self, machine, method, *args):
        assert isinstance(machine, bm.Machine), type(machine)
        return machine.call(method, *args, timeout=10)

    async def avia_handle(self, machine, method, *args):
        return await machine.acall(method, *args, timeout=10)

    def myself(self):
        return bm.current().machine

    def my_addr(self):
        return bm.current().machine.addr


@bm.service
class FailingInit:
    def init(self, machine):
        raise CustomError("init refused")

    def never(self):
        return "unreachable"


@bm.service
class GatedInit:
    """init waits until a file exists: the machine stays STARTING meanwhile."""

    def __init__(self, gate_path):
        self.gate_path = gate_path
        self.inited = False

    def init(self, machine):
        deadline = time.monotonic() + 20
        while not os.path.exists(self.gate_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.inited = os.path.exists(self.gate_path)

    def was_inited(self):
        return self.inited


@bm.service
class SlowInit:
    """Its init takes seconds (loading a model, say), well within the start timeout."""

    def __init__(self, seconds):
        self.seconds = seconds

    def init(self, machine):
        time.sleep(self.seconds)

    def ready(self):
        return "ready"

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


@bm.service
class Rendezvous:
    """Proves concurrency: n calls meet at a barrier only if they run at once."""

    def __init__(self, n):
        self.n = n
        self.barrier = None

    def init(self, machine):
        self.barrier = threading.Barrier(self.n)

    def meet(self, timeout):
        self.barrier.wait(timeout)
        return True


@bm.service
class LoopCaller:
    """Makes a blocking call from its async method, on the machine's IO loop."""

    async def blocking_call(self, addr):
        return bm.current().dial(addr).call("Echo.echo", 1, timeout=5)
