"""Observability: status, profiles, memory health, logs, status page, progress."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import fcntl
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

import bigmachine as bm
from tests.conftest import TIMING, Records, poll, profile_while
from tests.obs_services import Chatty, Work
from tests.services import Echo


@pytest.fixture(scope="module")
def duo():
    b = bm.start(**TIMING)
    try:
        machines = b.start(2, services={"Work": Work()})
        yield b, machines
    finally:
        b.shutdown()


@pytest.fixture(autouse=True)
def no_leaks():
    """Module sessions outlive single tests; test_api's leak check would flag them."""
    yield


def stats_of(status: bm.Status, name: str) -> bm.MachineStatus:
    return next(m for m in status if m.name == name)


# ---- status ------------------------------------------------------------------


def test_status_counts_equal_the_traffic(duo):
    b, (m0, m1) = duo
    for i in range(25):
        assert m0.call("Work.echo", i) == i
    for _ in range(3):
        with pytest.raises(ValueError):
            m0.call("Work.fail", "no")
    with pytest.raises(TimeoutError):
        m1.call("Work.slow", 2.0, timeout=0.2)
    status = b.status()
    s0, s1 = stats_of(status, "m0"), stats_of(status, "m1")
    echo, fail = s0.calls["Work.echo"], s0.calls["Work.fail"]
    assert (echo.count, echo.errors, echo.in_flight) == (25, 0, 0)
    assert (fail.count, fail.errors, fail.in_flight) == (3, 3, 0)
    assert (s0.caller_calls["Work.echo"].count, s0.caller_calls["Work.fail"].errors) == (25, 3)
    assert 0 < echo.p50 <= echo.p99 < 5
    assert 0 < s0.caller_calls["Work.echo"].p50 <= s0.caller_calls["Work.echo"].p99 < 5
    assert "Work.echo" not in s1.calls
    # The call that timed out is an error at the caller and, once cancelled, on the machine.
    assert s1.caller_calls["Work.slow"].errors == 1
    poll(lambda: stats_of(b.status(), "m1").calls["Work.slow"].errors == 1, timeout=10)


def test_status_in_flight_during_a_slow_call(duo):
    b, (m0, _) = duo
    t = threading.Thread(target=m0.call, args=("Work.slow", 1.5), daemon=True)
    t.start()
    try:
        s0 = poll(lambda: (s := stats_of(b.status(), "m0")).calls.get("Work.slow")
                  and s.calls["Work.slow"].in_flight == 1 and s, timeout=5)
        assert s0.caller_calls["Work.slow"].in_flight == 1
    finally:
        t.join(10)
    s0 = stats_of(b.status(), "m0")
    assert s0.calls["Work.slow"].in_flight == 0 and s0.caller_calls["Work.slow"].in_flight == 0


def test_status_records_and_table(duo):
    b, _ = duo
    poll(lambda: all(m.keepalive_rtt for m in b.status()), timeout=5)
    status = b.status()
    assert [m.name for m in status] == ["m0", "m1"]
    for m in status:
        assert m.state == "RUNNING" and m.healthy and m.err is None
        assert m.cpus >= 1 and 0 < m.rss < m.mem_total and m.uptime > 0 and m.load1 >= 0
        assert all(0 < rtt < 5 for rtt in m.keepalive_rtt)
    data = json.loads(json.dumps(status.to_dict()))
    assert bm.Status.from_dict(data).to_dict() == status.to_dict()
    table = str(status)
    assert "m0" in table and "m1" in table and "RUNNING" in table and "Work.echo" in table
    info = duo[1][0].info()
    assert info["cpus"] >= 1 and info["mem_total"] > 0 and info["hostname"] and info["pid"] > 0


def test_status_of_a_stopped_machine():
    with bm.start(**TIMING) as b:
        m, = b.start(1, services={"Work": Work()})
        os.kill(m.info()["pid"], signal.SIGKILL)
        m.wait(bm.State.STOPPED, timeout=10)
        status = b.status()
        assert status[0].state == "STOPPED" and not status[0].healthy and status[0].err
        assert "STOPPED" in str(status)


# ---- profiles ----------------------------------------------------------------


def test_merged_profile_names_a_function_under_the_one_machine_that_ran_it(duo, tmp_path):
    b, (m0, m1) = duo
    burning = threading.Thread(target=m0.call, args=("Work.burn", 2.5), daemon=True)
    burning.start()
    try:
        profile = b.profile(seconds=1.5, driver=True)
    finally:
        burning.join(10)
    assert profile.errors == {}
    assert profile.machines[:1] == ["driver"] or "m0" in profile.machines
    folded = profile.collapsed().splitlines()
    burns = [line for line in folded if "only_on_one_machine" in line]
    assert burns and all(line.startswith("m0;") for line in burns)
    assert sum(int(line.rsplit(" ", 1)[1]) for line in burns) >= 50  # ~100 Hz for 1.5 s
    assert "only_on_one_machine" in profile.top(5) and "m0" in profile.top(5)
    assert "only_on_one_machine" not in profile.machine("m1").collapsed()
    profile.save(str(tmp_path / "p.folded"))
    profile.save(str(tmp_path / "p.json"))
    assert (tmp_path / "p.folded").read_text() == profile.collapsed()
    speedscope = json.loads((tmp_path / "p.json").read_text())
    names = [p["name"] for p in speedscope["profiles"]]
    assert "m0" in names and speedscope["shared"]["frames"]
    with pytest.raises(bm.Error):
        profile.save(str(tmp_path / "p.png"))


def test_memory_profile_names_the_allocation_site(duo):
    b, (m0, _) = duo
    holding = threading.Thread(target=lambda: (time.sleep(0.3), m0.call("Work.hold", 8)), daemon=True)
    holding.start()
    memory = b.memory_profile(seconds=1.5, top=5, machines=[m0])
    holding.join(10)
    assert list(memory.sites) == ["m0"] and memory.errors == {}
    site, size, count = memory.sites["m0"][0]
    assert "obs_services.py" in site and size >= 8 << 20
    assert "obs_services.py" in str(memory)


# ---- logs --------------------------------------------------------------------


def test_a_machines_warning_reaches_the_drivers_logging_with_its_name(duo):
    b, (m0, m1) = duo
    records = Records()
    logger = logging.getLogger("bigmachine")
    logger.addHandler(records)
    try:
        m1.call("Work.warn", "careful")
        m1.call("Work.debug", "too fine for the driver's level")
        found = poll(lambda: [r for r in records.records if "careful" in r.getMessage()], timeout=5)
    finally:
        logger.removeHandler(records)
    record, = found
    assert record.machine == "m1" and record.getMessage() == "m1: careful from the machine"
    assert record.levelno == logging.WARNING and record.name == "bigmachine.machine.m1"
    assert record.remote_logger == "tests.obs"
    assert not any("too fine" in r.getMessage() for r in records.records)


def test_a_batch_the_driver_fails_to_take_is_dropped_and_counted_and_forwarding_goes_on(duo):
    # A driver-side filter that raises makes the Logs service fail that batch:
    # the machine drops it, counts it, and goes on shipping (it stopped for good).
    b, (m0, m1) = duo
    records = Records()
    logger = logging.getLogger("bigmachine")
    logger.addHandler(records)
    machine_logger = logging.getLogger("bigmachine.machine.m1")

    def poison(record):
        if "poison" in record.getMessage():
            raise RuntimeError("this driver's filter fails")
        return True

    machine_logger.addFilter(poison)
    try:
        m1.call("Work.warn", "poison")
        time.sleep(0.5)  # its batch is refused before the next one is sent
        m1.call("Work.warn", "after")

        def forwarded() -> list:
            return sorted(r.getMessage() for r in list(records.records) if r.name == machine_logger.name)

        poll(lambda: len(forwarded()) >= 2, timeout=10)
    finally:
        machine_logger.removeFilter(poison)
        logger.removeHandler(records)
    assert forwarded() == ["m1: 1 log records were dropped", "m1: after from the machine"]


def test_a_warning_from_a_services_init_reaches_the_drivers_logging():
    # The driver asks for the machine's records as it registers the services, and
    # the machine installs the forwarding before their init runs, so what init logs
    # is forwarded too: for every machine (one started alone, then five at once;
    # when the handler was installed later, on the IO loop, a third were missed).
    records = Records()
    logger = logging.getLogger("bigmachine")
    logger.addHandler(records)
    names = [f"m{i}" for i in range(6)]

    def started() -> dict:
        return {n: r for r in list(records.records) for n in names
                if f"{n} starting" in r.getMessage()}

    try:
        with bm.start(**TIMING) as b:
            b.start(1, services={"Chatty": Chatty()})
            b.start(5, services={"Chatty": Chatty()})
            poll(lambda: len(started()) == len(names), timeout=10)
    finally:
        logger.removeHandler(records)
    for name, record in started().items():
        assert record.name == f"bigmachine.machine.{name}" and record.levelno == logging.WARNING


def test_machines_in_the_drivers_process_do_not_forward_their_records():
    """An InProcess machine logs into the driver's own logging already: forwarding its
    records too would show each twice."""
    records = Records()
    logger = logging.getLogger()
    logger.addHandler(records)
    try:
        with bm.start(bm.InProcess(), **TIMING) as b:
            # One alone, then five registered from the driver's threads at once.
            machines = b.start(1, services={"Chatty": Chatty()}) + \
                b.start(5, services={"Chatty": Chatty()})
            for m in machines:
                m.call("Supervisor.ping", timeout=10)  # a round trip after init
            time.sleep(0.3)  # what a forwarder would have sent by now
    finally:
        logger.removeHandler(records)
    for i in range(6):
        names = [r.name for r in records.records if f"m{i} starting" in r.getMessage()]
        assert names == ["tests.obs"], (i, names)


# ---- memory health -----------------------------------------------------------


@pytest.fixture
def small_memory_cgroup():
    """A fresh memory cgroup limited to 300 MiB; removed after the test.

    v1 (this host): a child of our own memory cgroup. v2: a child of the root,
    where the memory controller is delegated. Never skipped: a host where it
    cannot be made fails the test, saying why.
    """
    from bigmachine import _resources

    limit = 300 << 20
    own = _resources.cgroup_dir("memory")
    if own is None:
        pytest.fail("no memory cgroup is visible under /sys/fs/cgroup: cannot test OOM handling")
    v2 = os.path.exists(f"{own}/cgroup.controllers")
    parent = _resources.CGROUP_ROOT if v2 else own
    path = f"{parent}/bigmachine-test-{os.getpid()}"
    try:
        os.mkdir(path)
        with open(f"{path}/{'memory.max' if v2 else 'memory.limit_in_bytes'}", "w") as f:
            f.write(str(limit))
    except OSError as exc:
        pytest.fail(f"cannot make a memory cgroup at {path} (root: {os.geteuid() == 0}): {exc}")
    try:
        yield path, limit
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_memory_hog_is_unhealthy_then_lost_out_of_memory(small_memory_cgroup):
    path, limit = small_memory_cgroup
    records = Records()
    logging.getLogger("bigmachine").addHandler(records)
    try:
        with bm.start(**TIMING) as b:
            m, = b.start(1, services={"Work": Work()})
            with open(f"{path}/cgroup.procs", "w") as f:
                f.write(str(m.info()["pid"]))
            assert m.call("Work.hold", 280) == 280  # 93% of 300 MiB
            s = b.status()[0]
            assert s.mem_total == limit and not s.healthy and "UNHEALTHY" in str(b.status())
            warnings = poll(lambda: [r for r in records.records if r.name == "bigmachine.machine.m0"
                                     and "over 90% of the limit" in r.getMessage()], timeout=5)
            assert len(warnings) == 1
            with pytest.raises(bm.MachineLost):
                m.call("Work.hold", 100, timeout=30)
            m.wait(bm.State.STOPPED, timeout=10)
            assert "out of memory" in str(m.err), m.err
            with pytest.raises(bm.MachineLost, match="out of memory"):
                m.call("Work.echo", 1)
            assert "out of memory" in str(b.status()[0].err)
    finally:
        logging.getLogger("bigmachine").removeHandler(records)


# ---- status page -------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    from tests.browser import ensure_chromium

    return ensure_chromium()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_status_page_on_loopback_with_a_token_renders_in_chromium(chromium):
    from tests.browser import render

    with bm.start(status_addr="127.0.0.1:0", **TIMING) as b:
        m0, m1 = b.start(2, services={"Work": Work()})
        for i in range(7):
            m0.call("Work.echo", i)
        url = b.status_url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]{20,}/", url)
        port = int(url.split(":")[2].split("/")[0])
        listening = [c.laddr for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)

        base = url.rsplit("/", 2)[0]
        assert get(f"{base}/")[0] == 404
        assert get(f"{base}/wrong-token/status.json")[0] == 404
        assert get(url + "nothing-here")[0] == 404
        code, body = get(url + "status.json")
        assert code == 200
        data = json.loads(body)
        assert [m["name"] for m in data["machines"]] == ["m0", "m1"]
        assert data["machines"][0]["calls"]["Work.echo"]["count"] == 7
        code, body = get(url + "profile?seconds=0.3")
        assert code == 200 and all(line.rsplit(" ", 1)[1].isdigit()
                                   for line in body.decode().splitlines())
        assert get(url + "profile?seconds=1000")[0] == 400

        dom, console = render(chromium, url)
        assert console == []
        rows = re.findall(r'<tr class="machine"><td>(m\d)</td><td>RUNNING</td>', dom)
        assert rows == ["m0", "m1"]
        assert "Work.echo" in dom and "<polyline" in dom
    with pytest.raises(urllib.error.URLError):  # shut down with its session
        urllib.request.urlopen(url + "status.json", timeout=5)


def _status_port(b) -> tuple[str, int, str]:
    """(host, port, token) of b.status_url."""
    hostport, token = b.status_url.split("://", 1)[1].split("/")[:2]
    host, port = hostport.rsplit(":", 1)
    return host, int(port), token


def test_status_page_never_logs_its_token():
    """The token is a capability: neither the start nor the requests' lines log it."""
    records = Records()
    logger = logging.getLogger("bigmachine")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        with bm.start(bm.InProcess(), status_addr="127.0.0.1:0", **TIMING) as b:
            _, port, token = _status_port(b)
            with urllib.request.urlopen(b.status_url + "status.json", timeout=10) as reply:
                assert reply.status == 200
            with pytest.raises(urllib.error.HTTPError):  # a wrong path logs too
                urllib.request.urlopen(b.status_url + "nope", timeout=10)
            poll(lambda: sum("nope" in r.getMessage() for r in records.records) == 1, timeout=10)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    logged = [r.getMessage() for r in records.records if r.name.startswith("bigmachine.statuspage")]
    assert any(str(port) in line for line in logged)  # the start is logged, without the token
    assert any("status.json" in line for line in logged)
    assert not [line for line in logged if token in line]


def test_status_page_closes_silent_connections_and_caps_how_many_it_serves():
    """Anyone on the host may connect: 200 connections that never finish a request
    line hold no driver thread each for ever, and the page still answers after."""
    with bm.start(bm.InProcess(), status_addr="127.0.0.1:0", **TIMING) as b:
        host, port, _ = _status_port(b)
        before = threading.active_count()
        socks = [socket.create_connection((host, port), timeout=5) for _ in range(200)]
        try:
            for s in socks:
                s.sendall(b"GET /")
            time.sleep(0.5)
            held = threading.active_count() - before
            deadline = time.monotonic() + 15.0
            still_open = 0
            for s in socks:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    still_open += s.recv(1) != b""
                except ConnectionResetError:
                    pass
                except socket.timeout:
                    still_open += 1
        finally:
            for s in socks:
                s.close()
        assert held <= 16 + 2, f"200 silent connections held {held} driver threads"
        assert still_open == 0, f"{still_open} of 200 silent connections were still open after 15 s"
        with urllib.request.urlopen(b.status_url + "status.json", timeout=10) as reply:
            assert reply.status == 200


def test_memory_profile_of_several_inprocess_machines_returns_a_memory_profile():
    # docs/observability.md: b.memory_profile(seconds, top, machines) "traces
    # allocations on the machines with tracemalloc for that window only, and
    # returns a bm.MemoryProfile"; InProcess is the system for users' own tests
    # and runs the same protocol. The machines share one tracemalloc: the first
    # to finish stops it under the others, whose RuntimeError escapes the call.
    with bm.start(bm.InProcess(), **TIMING) as b:
        b.start(2, services={"Echo": Echo()})
        profile = b.memory_profile(seconds=0.5, top=3)
        assert isinstance(profile, bm.MemoryProfile)
        assert "m0" in str(profile) and "m1" in str(profile)


def test_status_addr_is_checked():
    with pytest.raises(bm.Error, match="status_addr"):
        bm.start(status_addr="no-port")
    with pytest.raises(bm.Error, match="status_addr"):
        bm.start(status_addr=8080)


# ---- progress ----------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, numpy, bigmachine as bm
from tests.obs_services import Work
# shared_memory=False: a transfer's bytes cross the socket, where progress is shown
# (as shared memory, 384 MiB travel as one descriptor, with nothing to show).
with bm.start(progress=sys.argv[1] == "on", keepalive_period=0.25, shared_memory=False) as b:
    m0, m1, m2 = b.start(3, services={"Work": Work()})
    assert m0.call("Work.sink", numpy.ones(48 << 20)) == 384 << 20
print("done", flush=True)
"""


def run_with_stderr(on_pty: bool, option: str) -> str:
    """Run PROGRESS_SCRIPT with stderr on a pseudo-terminal or a pipe; its stderr."""
    import pty

    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", PROGRESS_SCRIPT, option]
    if not on_pty:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "done\n", done.stderr
        return done.stderr
    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, where tqdm draws nothing: make it a terminal's size.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0 and proc.stdout.read() == b"done\n", out[-2000:]
    finally:
        os.close(master)
        proc.stdout.close()
    return out.decode("utf-8", "replace")


def test_progress_shows_on_a_terminal_and_not_in_a_pipe():
    shown = run_with_stderr(True, "on")
    assert "starting machines" in shown and "sending to " in shown and "B/s" in shown
    piped = run_with_stderr(False, "on")
    assert "starting machines" not in piped and "sending to" not in piped and "\r" not in piped
    hidden = run_with_stderr(True, "off")
    assert "starting machines" not in hidden and "sending to" not in hidden


@bm.service
class Crunch:
    """A sync method that is compiled code (a builtin; as a Cython- or numba-compiled
    service method, or a numpy function, is): it has no Python frame of its own."""

    pbkdf2 = staticmethod(hashlib.pbkdf2_hmac)


@pytest.mark.timeout(60)
def test_the_profile_sees_a_reader_thread_busy_in_a_compiled_method():
    """A connection's reader thread runs sync methods itself; with _reader and
    _dispatch compiled, Thread.run is the leaf frame of a compiled method's work:
    the profile counts it as work (only threads in _profile.WAITING are waiting)."""
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Crunch": Crunch()})
        stacks = profile_while(
            lambda: m.call("Crunch.pbkdf2", "sha256", b"pw", b"salt", 200_000, timeout=30), 1.0)
        busy = sum(count for stack, count in stacks if stack[-1].startswith("Thread.run (threading.py"))
        assert busy >= 20, sorted(stacks, key=lambda s: -s[1])[:5]


@pytest.mark.timeout(60)
def test_the_memory_health_thread_sleeping_is_not_profiled_as_work():
    """The thread that checks memory every second sleeps in time.sleep, a C call
    with no frame of its own: its samples counted as work (all of them)."""
    from bigmachine import _profile
    with bm.start(bm.InProcess()) as b:
        b.start(1, services={"Echo": Echo()})
        stacks = _profile.sample(0.5, hz=100)
    health = sum(count for stack, count in stacks if "(_health.py:" in stack[-1])
    assert health == 0, sorted(stacks, key=lambda s: -s[1])[:3]


@pytest.mark.timeout(60)
def test_a_thread_waiting_for_the_reply_of_a_blocking_call_is_not_profiled_as_work():
    """A blocking call waits in the compiled Waiter.get, which leaves no frame.
    _profile.IDLE knew the wait by its leaf frame ("_rpc.py", "call"); with _rpc
    compiled as well (55e3dc9) the leaf was Machine._call, and every sample of a
    caller waiting for its reply was counted as work. Waiter.get now puts the
    thread in _profile.WAITING while it waits."""
    from bigmachine import _profile
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        # A deadline: the caller does not read its reply itself, it waits in Waiter.get.
        caller = threading.Thread(target=m.call, args=("Echo.sleep", 1.2), kwargs={"timeout": 30})
        caller.start()
        try:
            time.sleep(0.2)
            stacks = _profile.sample(0.5, hz=100)
        finally:
            caller.join(30)
        assert not caller.is_alive()
    waiting = [(stack[-1], count) for stack, count in stacks
               if "(_machine.py:" in stack[-1] or "(_rpc.py:" in stack[-1]]
    assert waiting == [], waiting


@pytest.mark.timeout(60)
def test_acalls_are_counted_at_the_caller_with_their_errors_and_cancels():
    import asyncio
    from tests.services import CustomError
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})

        async def main():
            for i in range(3):
                assert await m.acall("Echo.echo", i) == i
            with pytest.raises(CustomError):
                await m.acall("Echo.fail_custom", "no")
            slow = asyncio.ensure_future(m.acall("Echo.sleep", 5))
            await asyncio.sleep(0.2)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow

        asyncio.run(main())
        counts = {name: (c["count"], c["errors"], c["in_flight"])
                  for name, c in m.counters.snapshot().items()}
    assert counts["Echo.echo"] == (3, 0, 0)
    assert counts["Echo.fail_custom"] == (1, 1, 0)
    assert counts["Echo.sleep"] == (1, 1, 0)  # cancelled: an error, and no longer in flight
