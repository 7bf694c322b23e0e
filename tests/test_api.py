"""The public API against real machines (bm.Local): sessions, machines,
services, calls, errors, cancellation, streams, machines calling machines."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

import bigmachine as bm
from tests.conftest import TIMING, children, poll, shared, unshare
from tests.services import (BadInitError, CustomError, Echo, FailingInit, GatedInit, Relay,
                            Rendezvous, UnprintableError)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def duo():
    """Two machines with Echo and Relay, shared by the tests that only call them."""
    b = shared(bm.start(**TIMING))
    try:
        machines = b.start(2, services={"Echo": Echo("shared"), "Relay": Relay()})
        yield b, machines
    finally:
        unshare(b)


@pytest.fixture
def m(duo):
    return duo[1][0]


@bm.service
class LocalToTestModule:
    """A service class defined in the test module itself (importable as tests.test_api)."""

    def __init__(self, base):
        self.base = base

    def add(self, x):
        return self.base + x

    def module(self):
        return type(self).__module__


# ---- sessions and machines ---------------------------------------------------------


def test_state_ordering():
    assert bm.State.STARTING < bm.State.RUNNING < bm.State.STOPPED
    assert sorted([bm.State.STOPPED, bm.State.STARTING, bm.State.RUNNING]) == [
        bm.State.STARTING, bm.State.RUNNING, bm.State.STOPPED]


def test_service_decorator_returns_the_class():
    class Plain:
        pass

    assert bm.service(Plain) is Plain
    with pytest.raises(bm.Error):
        bm.service(Plain())  # decorates classes only


def test_start_as_context_manager_and_idempotent_shutdown():
    with bm.start(**TIMING) as b:
        assert isinstance(b, bm.B)
        assert isinstance(b.system, bm.Local)  # the default system
        machines = b.start(2, services={"Echo": Echo()})
        assert len(machines) == 2
        assert all(isinstance(x, bm.Machine) for x in machines)
        assert all(x.state == bm.State.RUNNING for x in machines)
        assert all(x.err is None for x in machines)
        assert len({x.addr for x in machines}) == 2
        for x in machines:  # Local links are Unix sockets in a private directory
            assert x.addr.startswith("unix:/") and x.addr.endswith(f"/{x.name}.sock"), x.addr
            assert stat.S_IMODE(os.stat(os.path.dirname(x.addr[5:])).st_mode) == 0o700
        assert set(b.machines()) == set(machines)
        pids = [x.info()["pid"] for x in machines]
        assert set(pids) <= children()
    # __exit__ shut the session down: machines stopped, with a reason
    for x in machines:
        assert x.state == bm.State.STOPPED
        assert isinstance(x.err, bm.MachineLost)
        assert x.wait(bm.State.RUNNING, timeout=0) == bm.State.STOPPED
    b.shutdown()  # idempotent
    b.shutdown()
    with pytest.raises(bm.Error):
        b.start(1, services={"Echo": Echo()})
    with pytest.raises(bm.MachineLost):
        machines[0].call("Echo.echo", 1, timeout=5)
    assert not set(pids) & children()


def test_shutdown_without_context_manager():
    b = bm.start(**TIMING)
    m0, = b.start(1, services={"Echo": Echo()})
    assert m0.call("Echo.echo", "x", timeout=10) == "x"
    b.shutdown()
    assert m0.state == bm.State.STOPPED
    b.shutdown()


def test_start_rejects_bad_arguments(cluster):
    before = children()
    with pytest.raises(bm.Error):
        cluster.start(0, services={"Echo": Echo()})
    with pytest.raises(bm.Error):
        cluster.start(1, services={})
    with pytest.raises(bm.Error):
        cluster.start(1, services={"X": object()})  # not a @service instance
    with pytest.raises(bm.Error):
        cluster.start(1, services={"A.b": Echo()})  # dotted name
    with pytest.raises(bm.Error):
        cluster.start(1, services={"Supervisor": Echo()})  # reserved
    bad = Echo()
    bad.lock = threading.Lock()
    with pytest.raises(bm.Error, match="pickle"):
        cluster.start(1, services={"Echo": bad})  # checked before a process starts
    assert children() == before
    assert cluster.machines() == []


def test_start_rejects_unknown_options():
    with pytest.raises(bm.Error):
        bm.start(no_such_option=1)
    with pytest.raises(bm.Error):
        bm.start(keepalive_period=-1)


def test_init_runs_once_on_the_machine_before_running(cluster):
    m0, = cluster.start(1, services={"Echo": Echo()})
    assert m0.call("Echo.init_info", timeout=10) == (1, m0.addr)
    # it ran on the machine, not in the driver: the driver's instance is untouched
    local = Echo()
    assert local.init_calls == 0


def test_machine_is_starting_until_init_returns(cluster, tmp_path):
    gate = tmp_path / "gate"
    result: dict = {}

    def start():
        try:
            result["machines"] = cluster.start(1, services={"G": GatedInit(str(gate))}, timeout=30)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    t = threading.Thread(target=start)
    t.start()
    try:
        machines = poll(cluster.machines, timeout=10)
        m0 = machines[0]
        assert m0.state == bm.State.STARTING
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            m0.wait(bm.State.RUNNING, timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert m0.state == bm.State.STARTING
    finally:
        gate.touch()
        t.join(30)
    assert not t.is_alive()
    assert "error" not in result, result
    assert result["machines"] == [m0]
    assert m0.wait(bm.State.RUNNING, timeout=5) == bm.State.RUNNING
    assert m0.call("G.was_inited", timeout=10) is True


def test_exception_in_init_fails_start(cluster):
    before = children()
    with pytest.raises(CustomError, match="init refused") as info:
        cluster.start(2, services={"F": FailingInit()}, timeout=30)
    # the remote traceback shows the frame of init on the machine
    assert ", in init" in "".join(traceback.format_exception(info.value))
    assert cluster.machines() == []  # stopped machines are not listed
    poll(lambda: children() <= before, timeout=5)
    # the same start without waiting: handles that end STOPPED with their causes
    machines = cluster.start(2, services={"F": FailingInit()}, timeout=30, wait=False)
    for x in machines:
        assert x.wait(bm.State.STOPPED, timeout=30) == bm.State.STOPPED
        assert x.err is not None
    assert any(isinstance(x.err, CustomError) for x in machines)
    with pytest.raises(bm.MachineLost) as lost:
        machines[0].call("F.anything", timeout=5)
    assert lost.value.__cause__ is machines[0].err or lost.value.__cause__ is not None
    poll(lambda: children() <= before, timeout=5)
    # the session itself is still usable
    m0, = cluster.start(1, services={"Echo": Echo()})
    assert m0.call("Echo.echo", 3, timeout=10) == 3


def test_exception_in_init_fails_the_start_of_a_single_machine(cluster):
    # One machine boots in the caller's thread, not in a pool's: the same outcome.
    before = children()
    with pytest.raises(CustomError, match="init refused") as info:
        cluster.start(1, services={"F": FailingInit()}, timeout=30)
    assert ", in init" in "".join(traceback.format_exception(info.value))
    assert cluster.machines() == []
    poll(lambda: children() <= before, timeout=5)
    m, = cluster.start(1, services={"F": FailingInit()}, timeout=30, wait=False)
    assert m.wait(bm.State.STOPPED, timeout=30) == bm.State.STOPPED
    assert isinstance(m.err, CustomError)
    poll(lambda: children() <= before, timeout=5)


# ---- services: shipping ------------------------------------------------------------


def test_service_class_from_test_module(cluster):
    m0, = cluster.start(1, services={"L": LocalToTestModule(40)})
    assert m0.call("L.add", 2, timeout=10) == 42
    assert m0.call("L.module", timeout=10) == __name__


def test_instance_state_is_shipped(m):
    assert m.call("Echo.get_tag", timeout=10) == "shared"


MAIN_SCRIPT = '''
import sys
import bigmachine as bm

@bm.service
class MainService:
    def __init__(self, k):
        self.k = k
    def init(self, machine):
        self.ready = "ready"
    def mul(self, x):
        return x * self.k
    def apply(self, f, x):
        return f(x)
    def state(self):
        return self.ready
    def gen(self, n):
        for i in range(n):
            yield i * self.k

class Point:
    def __init__(self, x):
        self.x = x

if __name__ == "__main__":
    with bm.start() as b:
        m, = b.start(1, services={"Main": MainService(3)})
        p = m.call("Main.apply", lambda p: Point(p.x + 1), Point(41), timeout=20)
        print("RESULT", m.call("Main.mul", 14, timeout=20), m.call("Main.apply", lambda v: v + 1, 41),
              type(p).__name__, p.x, m.call("Main.state"), list(m.stream("Main.gen", 3)))
        sys.stdout.flush()
'''


def test_service_class_from_main_script(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 42 42 Point 42 ready [0, 3, 6]" in proc.stdout, (proc.stdout, proc.stderr)


def test_service_class_from_python_c(tmp_path):
    code = textwrap.dedent('''
        import bigmachine as bm
        @bm.service
        class C:
            def hello(self, who):
                return "hello " + who
        with bm.start() as b:
            m, = b.start(1, services={"C": C()})
            print(m.call("C.hello", "world", timeout=20))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello world"


# ---- calls ----------------------------------------------------------------------------


def test_args_kwargs_and_replies(m):
    assert m.call("Echo.combine", 1, timeout=10) == {"a": 1, "b": 2, "rest": [], "k": None, "kw": {}}
    assert m.call("Echo.combine", 1, 3, 4, 5, k="K", z=[1, 2], timeout=10) == {
        "a": 1, "b": 3, "rest": [4, 5], "k": "K", "kw": {"z": [1, 2]}}
    value = {"nested": [1, 2.5, None, ("t", b"bytes")], "big": b"x" * 100_000, "s": {1, 2}}
    assert m.call("Echo.echo", value, timeout=10) == value
    assert m.call("Echo.echo", None, timeout=10) is None
    # an argument called "timeout" is ours; other names pass through
    assert m.call("Echo.combine", a=1, b=2, timeout=10)["a"] == 1


def test_sync_methods_run_concurrently_in_a_thread_pool(cluster):
    m0, = cluster.start(1, services={"Echo": Echo(), "R": Rendezvous(2)})
    name = m0.call("Echo.thread_name", timeout=10)
    assert name.startswith(f"bigmachine-{m0.name}"), name
    # two calls meet at a barrier: they can only if they run at the same time
    results = []
    ts = [threading.Thread(target=lambda: results.append(m0.call("R.meet", 5, timeout=10)))
          for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(15)
    assert results == [True, True]
    # and a slow sync call does not hold up another one
    t0 = time.monotonic()
    slow = threading.Thread(target=m0.call, args=("Echo.sleep", 1.0), kwargs={"timeout": 10})
    slow.start()
    time.sleep(0.05)
    assert m0.call("Echo.echo", "quick", timeout=10) == "quick"
    quick = time.monotonic() - t0
    slow.join(10)
    total = time.monotonic() - t0
    assert quick < 0.6, quick
    assert total >= 1.0
    # two slow calls overlap
    t0 = time.monotonic()
    ts = [threading.Thread(target=m0.call, args=("Echo.sleep", 0.6), kwargs={"timeout": 10})
          for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert time.monotonic() - t0 < 1.1


def test_async_methods_run_on_the_event_loop(m):
    name = m.call("Echo.athread_name", timeout=10)
    assert name.startswith("bigmachine-io-"), name
    assert m.call("Echo.thread_name", timeout=10) != name

    async def two():
        t0 = time.monotonic()
        r = await asyncio.gather(m.acall("Echo.asleep", 0.5, timeout=10),
                                 m.acall("Echo.asleep", 0.5, timeout=10))
        return r, time.monotonic() - t0

    results, elapsed = asyncio.run(two())
    assert results == [0.5, 0.5]
    assert elapsed < 0.9, elapsed


def test_an_async_method_runs_in_a_task_named_after_it(m):
    # Before its first await too: what asyncio.timeout() and friends rely on.
    name, listed, made = m.call("Echo.atask", timeout=10)
    assert (name, listed, made) == ("Echo.atask", True, 0)


def test_a_task_factory_set_on_the_machines_loop_makes_its_tasks(m):
    m.call("Echo.use_task_factory", True, timeout=10)
    try:
        assert m.call("Echo.atask", timeout=10) == ("Echo.atask", True, 1)
        assert m.call("Echo.aecho", 5, timeout=10) == 5
        assert m.call("Echo.atask", timeout=10) == ("Echo.atask", True, 3)
    finally:
        m.call("Echo.use_task_factory", False, timeout=10)
    assert m.call("Echo.atask", timeout=10) == ("Echo.atask", True, 0)


def test_a_task_factory_that_fails_fails_the_call_not_the_others(m):
    # It fails the next 3 tasks, then makes them: the 3 calls fail at once
    # (they used to wait for ever), the rest of their batch is served.
    m.call("Echo.use_task_factory", True, 3, timeout=10)
    try:
        async def batch():
            return await asyncio.gather(*(m.acall("Echo.aecho", i, timeout=10) for i in range(5)),
                                        m.acall("Echo.echo", 5, timeout=10),
                                        return_exceptions=True)
        results = asyncio.run(batch())
        for exc in results[:3]:  # requests are read, and their tasks made, in order
            assert isinstance(exc, bm.Error), results
            assert "cannot start Echo.aecho: the loop's task factory raised CustomError: " \
                   "no tasks today" in str(exc)
        assert results[3:] == [3, 4, 5]
    finally:
        m.call("Echo.use_task_factory", False, timeout=10)
    assert m.call("Echo.aecho", 6, timeout=10) == 6


def test_a_task_factory_that_raises_a_base_exception_fails_the_call_not_the_others(m):
    # asyncio.CancelledError is a BaseException: the call it fails must still be
    # answered, and (Python 3.12+, one loop callback starts a read's methods)
    # the methods read with it must still start.
    m.call("Echo.use_task_factory", True, 1, True, timeout=10)
    try:
        async def batch():
            return await asyncio.gather(*(m.acall("Echo.aecho", i, timeout=5) for i in range(3)),
                                        return_exceptions=True)
        results = asyncio.run(batch())
        assert isinstance(results[0], bm.Error), results
        assert "cannot start Echo.aecho: the loop's task factory raised CancelledError" in str(results[0])
        assert results[1:] == [1, 2]
    finally:
        m.call("Echo.use_task_factory", False, timeout=10)


@pytest.mark.parametrize("first_step", [True, False])
def test_an_async_method_cancelled_by_itself_fails_the_call_instead_of_hanging(m, first_step):
    # Only a cancel from the caller (or the connection's loss) goes unanswered:
    # a method whose own task is cancelled (by itself here, in its first step
    # or later; or by code it runs) must still answer its caller.
    with pytest.raises(bm.Error, match="cancelled"):
        m.call("Echo.acancel_self", first_step, timeout=5)
    assert m.call("Echo.aecho", 1, timeout=10) == 1


def test_an_async_generator_cancelled_by_itself_fails_the_stream_instead_of_hanging(m):
    got = []
    with pytest.raises(bm.Error, match="cancelled"):
        for item in m.stream("Echo.acount_then_cancel_self", 2, timeout=5):
            got.append(item)
    assert got == [0, 1]


def test_remote_exception_is_reraised_with_remote_traceback(m):
    with pytest.raises(ValueError, match="boom 7") as info:
        m.call("Echo.fail_value", "boom 7", timeout=10)
    exc = info.value
    assert type(exc) is ValueError
    assert exc.__cause__ is not None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert "fail_value" in text
    assert "_deep_helper_raises" in text
    assert "services.py" in text
    # an importable custom type comes back as itself
    with pytest.raises(CustomError, match="mine"):
        m.call("Echo.fail_custom", "mine", timeout=10)


def test_remote_exception_from_async(m):
    async def go():
        with pytest.raises(CustomError, match="async too") as info:
            await m.acall("Echo.fail_custom", "async too", timeout=10)
        return "".join(traceback.format_exception(info.value))

    assert "fail_custom" in asyncio.run(go())


def test_unpicklable_exception_falls_back_to_remote_error(m):
    with pytest.raises(bm.RemoteError) as info:
        m.call("Echo.fail_bad_init", timeout=10)
    exc = info.value
    assert isinstance(exc, bm.Error)
    assert exc.remote_type.endswith("BadInitError")
    assert "x-y" in str(exc)
    assert "fail_bad_init" in exc.remote_traceback
    assert "fail_bad_init" in "".join(traceback.format_exception(exc))
    # sanity: the type really cannot be rebuilt from its args
    with pytest.raises(TypeError):
        BadInitError(*BadInitError("x", "y").args)


@pytest.mark.parametrize("method", ["Echo.fail_unprintable", "Echo.afail_unprintable",
                                    "Echo.fail_unprintable_midstream"])
def test_an_exception_whose_str_fails_still_reaches_the_caller(m, method):
    """Its message is replaced, not its type: the caller gets it at once, not a timeout."""
    with pytest.raises(UnprintableError):
        if method.endswith("midstream"):
            list(m.stream(method, timeout=10))
        else:
            m.call(method, timeout=10)
    assert m.call("Echo.echo", 1, timeout=10) == 1


# ---- misuse gets a bm.Error (found by an API review helper) ----


def test_ec2_takes_session_options_as_keywords_like_every_system():
    # docs/machines.md, "Session options": "a system takes them as keyword
    # arguments too, e.g. bm.Local(tls=True)"; design.md: bm.EC2 is "TLS always",
    # and plain TCP is "refused with a bm.Error". Nothing here talks to AWS.
    assert bm.EC2(ami="ami-0123456789abcdef0", tls=True).tls is True
    with pytest.raises(bm.Error):
        bm.start(bm.EC2(ami="ami-0123456789abcdef0", tls=False, insecure=True))




@pytest.mark.parametrize("system", ["local", bm.InProcess], ids=["a-string", "the-class"])
def test_start_with_something_that_is_not_a_system_raises_error(system):
    # docs/failures.md: "Every error bigmachine raises derives from bm.Error", and a
    # misuse is a bm.Error; bm.start(system=None, **options) takes a System instance.
    with pytest.raises(bm.Error):
        bm.start(system)




@pytest.mark.parametrize("option,value", [
    ("lost_after", float("nan")),
    ("lease", float("nan")),
    ("keepalive_period", True),
])
def test_timing_options_refuse_values_that_are_not_seconds(option, value):
    # docs/machines.md, "Session options": "An unknown option, or a value of the
    # wrong type, raises bm.Error"; the code's own check says "must be a positive
    # number of seconds". NaN is not positive, and True is not a number of seconds
    # (socket_buffer already refuses bools). A NaN lost_after also defeats the
    # lease > lost_after + keepalive_period check and never declares a machine lost.
    with pytest.raises(bm.Error):
        bm.InProcess(**{option: value})


def test_status_addr_with_a_port_out_of_range_raises_error():
    # docs/machines.md: a value of the wrong kind raises bm.Error; the code checks
    # status_addr's form with bm.Error but lets the bind's OverflowError through.
    with pytest.raises(bm.Error):
        bm.start(bm.InProcess(), status_addr="127.0.0.1:99999").shutdown()




@pytest.fixture
def inproc():
    """An InProcess session with one Echo machine."""
    with bm.start(bm.InProcess(), **TIMING) as b:
        m, = b.start(1, services={"Echo": Echo()})
        yield b, m


@pytest.mark.parametrize("addr", [123, "no-port-here"])
def test_dial_of_a_malformed_address_is_an_error_and_leaves_no_running_handle(inproc, addr):
    # design.md: b.dial(addr) takes "host:port" or "unix:/path"; docs/failures.md:
    # every error bigmachine raises derives from bm.Error, and a dialled handle
    # "becomes STOPPED only when a dial fails"; b.machines() lists the machines
    # that are not STOPPED, and str(b.status()) renders a table.
    b, _ = inproc
    with pytest.raises(bm.Error):
        b.dial(addr).call("Echo.echo", 1, timeout=10)
    assert [m for m in b.machines() if m.addr == addr] == []
    assert "m0" in str(b.status())


# ---- b.status() after a misused call ----------------------------------------------------


def test_a_call_with_a_non_string_method_does_not_break_the_status_table(inproc):
    # design.md: b.status() returns a bm.Status whose str() "renders a table with a
    # row per machine and a row per machine and method". A call refused with
    # bm.Error before anything was sent must not leave a method that cannot be named.
    b, m = inproc
    m.call("Echo.echo", 1, timeout=10)
    with pytest.raises(bm.Error):
        m.call(123, timeout=10)
    table = str(b.status())
    assert "Echo.echo" in table


def test_start_with_env_that_is_not_a_mapping_raises_error():
    with bm.start(bm.InProcess(), **TIMING) as b:
        with pytest.raises(bm.Error):
            b.start(1, services={"Echo": Echo()}, env=[("NAME", "value")])


class GatedLaunch(bm.InProcess):
    """InProcess whose launches after the first wait for a gate: a batch started
    with wait=False then stays STARTING, not yet launched, for as long as a test needs."""

    def __init__(self, **options):
        super().__init__(**options)
        self.gate = threading.Event()
        self.launches = 0

    def launch(self, *args, **kwargs):
        self.launches += 1
        if self.launches > 1:
            self.gate.wait(30)
        return super().launch(*args, **kwargs)


def test_a_starting_handle_passed_as_an_argument_arrives_usable():
    # design.md: "wait=False returns at once with STARTING handles; a call on a
    # STARTING machine waits for RUNNING", and "a Machine passed as an argument or
    # reply arrives as a usable handle". A handle pickled before its machine was
    # launched carries the address "" and arrives as a handle that cannot dial.
    system = GatedLaunch(**TIMING)
    with bm.start(system) as b:
        m0, = b.start(1, services={"Relay": Relay()})
        m1, = b.start(1, services={"Echo": Echo()}, wait=False)
        assert m1.state == bm.State.STARTING
        timer = threading.Timer(0.5, system.gate.set)
        timer.start()
        try:
            assert m0.call("Relay.via_handle", m1, "Echo.echo", 9, timeout=30) == 9
        finally:
            system.gate.set()
            timer.cancel()
            m1.wait(bm.State.RUNNING, timeout=30)


def test_a_starting_handle_passed_from_async_code_is_an_error_that_says_what_to_do():
    """Pickling on an event loop must not block it: it says to await RUNNING first."""
    system = GatedLaunch(**TIMING)
    with bm.start(system) as b:
        m0, = b.start(1, services={"Relay": Relay()})
        m1, = b.start(1, services={"Echo": Echo()}, wait=False)
        try:
            with pytest.raises(bm.Error, match="still starting"):
                asyncio.run(m0.acall("Relay.via_handle", m1, "Echo.echo", 9, timeout=30))
        finally:
            system.gate.set()
            m1.wait(bm.State.RUNNING, timeout=30)


def test_unknown_service_and_method(m):
    with pytest.raises(bm.Error) as info:
        m.call("Nope.echo", 1, timeout=10)
    assert "Nope" in str(info.value) and "Echo" in str(info.value) and "Relay" in str(info.value)
    with pytest.raises(bm.Error) as info:
        m.call("Echo.nope", timeout=10)
    text = str(info.value)
    assert "nope" in text and "echo" in text and "combine" in text
    with pytest.raises(bm.Error):
        m.call("Echo._private", timeout=10)  # private attributes are not methods
    with pytest.raises(bm.Error):
        m.call("Echo.init", m, timeout=10)  # init is not callable remotely
    with pytest.raises(bm.Error):
        m.call("noDot", timeout=10)
    assert m.call("Echo.echo", "still fine", timeout=10) == "still fine"


def test_unpicklable_argument_fails_before_sending(m):
    # Were it sent, the machine would answer "no service"; it fails locally instead.
    with pytest.raises(bm.Error) as info:
        m.call("NoSuchService.x", threading.Lock(), timeout=10)
    assert "pickle" in str(info.value) and "NoSuchService" in str(info.value)
    assert "no service" not in str(info.value)

    async def go():
        with pytest.raises(bm.Error, match="pickle"):
            await m.acall("NoSuchService.x", lock=threading.Lock(), timeout=10)

    asyncio.run(go())
    assert m.call("Echo.echo", 1, timeout=10) == 1
    poll(lambda: m.stats()["open_calls"] == 1)  # only the stats call itself


def test_timeout_cancels_sync_work(m):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        m.call("Echo.wait_cancel", "sync-timeout", timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.29 <= elapsed < 1.5, elapsed
    assert poll(lambda: m.call("Echo.event", "sync-timeout", timeout=10) == "cancelled")
    assert m.call("Echo.echo", "usable", timeout=10) == "usable"
    poll(lambda: m.stats()["open_calls"] == 1)


def test_timeout_cancels_async_work(m):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        m.call("Echo.await_cancel", "async-timeout", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert poll(lambda: m.call("Echo.event", "async-timeout", timeout=10) == "CancelledError")
    assert m.call("Echo.echo", "usable", timeout=10) == "usable"


def test_acall_timeout_and_task_cancel_cancel_remote_work(m):
    async def go():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await m.acall("Echo.wait_cancel", "acall-timeout", timeout=0.3)
        assert time.monotonic() - t0 < 1.5
        # cancelling the awaiting task cancels the remote work too
        task = asyncio.ensure_future(m.acall("Echo.await_cancel", "task-cancel", timeout=30))
        while await m.acall("Echo.event", "task-cancel", timeout=10) != "started":
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(250):  # the machine notices within its polling interval
            if (await m.acall("Echo.event", "task-cancel", timeout=10) == "CancelledError"
                    and await m.acall("Echo.event", "acall-timeout", timeout=10) == "cancelled"):
                break
            await asyncio.sleep(0.02)
        return (await m.acall("Echo.event", "acall-timeout", timeout=10),
                await m.acall("Echo.event", "task-cancel", timeout=10))

    assert asyncio.run(asyncio.wait_for(go(), 30)) == ("cancelled", "CancelledError")


def test_acall_and_astream_from_successive_asyncio_runs(m):
    for i in range(3):
        async def go():
            reply = await m.acall("Echo.echo", i, timeout=10)
            items = [x async for x in m.astream("Echo.acount", 5, timeout=10)]
            sync_items = [x async for x in m.astream("Echo.count", 3, timeout=10)]
            return reply, items, sync_items

        assert asyncio.run(asyncio.wait_for(go(), 20)) == (i, [0, 1, 2, 3, 4], [0, 1, 2])
    # and the blocking API still works in between
    assert m.call("Echo.echo", "sync", timeout=10) == "sync"


def test_many_concurrent_acalls(m):
    async def go():
        return await asyncio.gather(*(m.acall("Echo.echo", i, timeout=20) for i in range(200)))

    assert asyncio.run(asyncio.wait_for(go(), 30)) == list(range(200))


def test_calls_from_many_threads(m):
    errors: list = []
    results: dict = {}

    def worker(t):
        try:
            for j in range(40):
                got = m.call("Echo.echo", (t, j), timeout=20)
                assert got == (t, j), got
            results[t] = True
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(results) == 12


# ---- streams ----------------------------------------------------------------------


def test_stream_and_astream(m):
    assert list(m.stream("Echo.count", 5, timeout=10)) == [0, 1, 2, 3, 4]
    assert list(m.stream("Echo.acount", 5, timeout=10)) == [0, 1, 2, 3, 4]
    assert list(m.stream("Echo.count", 0, timeout=10)) == []
    # more items than the flow-control window
    assert list(m.stream("Echo.count", 1000, timeout=10)) == list(range(1000))

    async def go():
        return [x async for x in m.astream("Echo.acount", 1000, timeout=10)]

    assert asyncio.run(go()) == list(range(1000))


def test_stream_error_midway(m):
    got = []
    with pytest.raises(CustomError, match="after 3"):
        for x in m.stream("Echo.fail_midstream", 3, timeout=10):
            got.append(x)
    assert got == [0, 1, 2]


def test_stream_item_timeout_cancels_generator(m):
    it = m.stream("Echo.stalled_stream", "stalled", timeout=0.3)
    assert next(it) == 0
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        next(it)
    assert 0.29 <= time.monotonic() - t0 < 1.5
    assert poll(lambda: m.call("Echo.event", "stalled", timeout=10) == "cancelled")
    poll(lambda: m.stats()["open_calls"] == 1)


def test_call_on_generator_and_stream_on_plain_method_are_refused(m):
    with pytest.raises(bm.Error, match="stream"):
        m.call("Echo.count", 3, timeout=10)
    with pytest.raises(bm.Error, match="call"):
        list(m.stream("Echo.echo", 3, timeout=10))


def test_stream_break_closes_generator_on_machine(m):
    for x in m.stream("Echo.forever", "sync-gen", timeout=10):
        if x == 5:
            break
    assert poll(lambda: m.call("Echo.event", "sync-gen", timeout=10) == "closed")
    # an async generator, consumed by the blocking iterator
    for x in m.stream("Echo.aforever", "async-gen-sync", timeout=10):
        if x == 5:
            break
    assert poll(lambda: m.call("Echo.event", "async-gen-sync", timeout=10) == "closed")
    it = m.stream("Echo.forever", "sync-gen-close", timeout=10)
    assert next(it) == 0
    it.close()
    assert poll(lambda: m.call("Echo.event", "sync-gen-close", timeout=10) == "closed")
    poll(lambda: m.stats()["open_calls"] == 1)


def test_astream_break_closes_async_generator_on_machine(m):
    async def go():
        async for x in m.astream("Echo.aforever", "async-gen", timeout=10):
            if x == 5:
                break
        for _ in range(250):
            if await m.acall("Echo.event", "async-gen", timeout=10) == "closed":
                return "closed"
            await asyncio.sleep(0.02)
        return await m.acall("Echo.event", "async-gen", timeout=10)

    assert asyncio.run(asyncio.wait_for(go(), 20)) == "closed"

    async def explicit():
        agen = m.astream("Echo.forever", "sync-gen-aclose", timeout=10)
        assert await agen.__anext__() == 0
        await agen.aclose()

    asyncio.run(asyncio.wait_for(explicit(), 20))
    assert poll(lambda: m.call("Echo.event", "sync-gen-aclose", timeout=10) == "closed")


# ---- machines calling machines -------------------------------------------------------


def test_machine_dials_another_by_address(duo):
    _, (m0, m1) = duo
    assert m0.call("Relay.via_addr", m1.addr, "Relay.my_addr", timeout=20) == m1.addr
    assert m1.call("Relay.via_addr", m0.addr, "Echo.echo", "hi", timeout=20) == "hi"


def test_machine_as_argument_and_reply(duo):
    b, (m0, m1) = duo
    assert m0.call("Relay.via_handle", m1, "Relay.my_addr", timeout=20) == m1.addr
    assert m0.call("Relay.avia_handle", m1, "Echo.echo", 9, timeout=20) == 9
    handle = m1.call("Relay.myself", timeout=20)
    assert isinstance(handle, bm.Machine)
    assert handle.addr == m1.addr
    assert handle.call("Echo.echo", "back", timeout=10) == "back"
    # a remote error from a machine called by a machine still has its type
    with pytest.raises(CustomError, match="relayed"):
        m0.call("Relay.via_handle", m1, "Echo.fail_custom", "relayed", timeout=20)


def test_machine_reply_after_another_session_came_and_went(duo):
    """A second session starting and stopping must not break the first one."""
    _, (m0, m1) = duo
    with bm.start(**TIMING) as other:
        other.start(1, services={"Echo": Echo()})
    handle = m0.call("Relay.myself", timeout=20)
    assert handle.addr == m0.addr
    assert handle.call("Echo.echo", 1, timeout=10) == 1


def test_dial_returns_unowned_handle(duo):
    b, (m0, _) = duo
    h = b.dial(m0.addr)
    assert h is not m0 and not h.owned and m0.owned  # a handle of its own, even on our machine
    assert h.addr == m0.addr
    assert h.call("Echo.echo", 5, timeout=10) == 5
    with pytest.raises(bm.Error, match="only its owner"):
        h.shutdown()
    assert b.dial(m0.addr) is h  # one handle per address


def test_socket_buffer_option_reaches_both_ends():
    import socket as _socket

    with bm.start(bm.InProcess(socket_buffer=256 << 10)) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert m.call("Echo.echo", 1, timeout=10) == 1
        driver_side = m.connection().sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF)
        assert driver_side == 2 * (256 << 10)  # Linux doubles what was asked for
        machine_node = m.process.node
        accepted = next(iter(machine_node.accepted))
        assert accepted.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF) == 2 * (256 << 10)
    with pytest.raises(bm.Error, match="socket_buffer"):
        bm.InProcess(socket_buffer=-1)


def _busy_poll_windows(m):
    spin = m.connection().reader.spin
    return None if spin is None else spin.window, m.call("Echo.busy_poll", timeout=10)


def test_busy_poll_option_reaches_both_ends():
    with bm.start(bm.Local(busy_poll=250e-6), **TIMING) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert _busy_poll_windows(m) == (250e-6, 250e-6)  # the machine took it over its bootstrap
    with bm.start(bm.InProcess(), busy_poll=0) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert _busy_poll_windows(m) == (None, None)
    with bm.start(bm.InProcess(tls=True), busy_poll=500e-6) as b:  # TLS links poll too
        m, = b.start(1, services={"Echo": Echo()})
        assert _busy_poll_windows(m) == (500e-6, 500e-6)
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert _busy_poll_windows(m) == (300e-6, 300e-6)  # the default


@pytest.mark.parametrize("value", [-1e-6, 0.002, float("nan"), float("inf"), True, "1e-4", None])
def test_busy_poll_option_refuses_what_is_not_a_short_number_of_seconds(value):
    with pytest.raises(bm.Error, match="busy_poll"):
        bm.InProcess(busy_poll=value)
