"""bm.InProcess(): the same API with machines inside the test process."""
from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback

import pytest

import bigmachine as bm
from tests.conftest import children, poll
from tests.services import CustomError, Echo, FailingInit, Relay

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def inproc():
    b = bm.start(bm.InProcess(keepalive_period=0.25, lost_after=5.0))
    try:
        yield b
    finally:
        b.shutdown()


def test_inprocess_calls_and_no_processes(inproc):
    before = children()
    m0, m1 = inproc.start(2, services={"Echo": Echo("inproc"), "Relay": Relay()})
    assert isinstance(inproc.system, bm.InProcess)
    assert m0.state == m1.state == bm.State.RUNNING
    assert m0.call("Echo.echo", [1, "two"], timeout=10) == [1, "two"]
    assert m0.call("Echo.combine", 1, 2, 3, k=4, timeout=10) == {
        "a": 1, "b": 2, "rest": [3], "k": 4, "kw": {}}
    assert m0.call("Echo.get_tag", timeout=10) == "inproc"
    assert m0.call("Echo.init_info", timeout=10) == (1, m0.addr)
    assert m0.info()["pid"] == os.getpid()  # really in this process
    assert children() == before
    # machines call each other, by address and by handle
    assert m0.call("Relay.via_addr", m1.addr, "Relay.my_addr", timeout=10) == m1.addr
    assert m0.call("Relay.via_handle", m1, "Echo.echo", 5, timeout=10) == 5
    handle = m1.call("Relay.myself", timeout=10)
    assert handle.addr == m1.addr and handle.call("Echo.echo", 6, timeout=10) == 6

    async def go():
        return (await m0.acall("Echo.asleep", 0.01, timeout=10),
                [x async for x in m1.astream("Echo.acount", 4, timeout=10)])

    assert asyncio.run(go()) == (0.01, [0, 1, 2, 3])
    assert asyncio.run(go()) == (0.01, [0, 1, 2, 3])


def test_inprocess_streams(inproc):
    m0, = inproc.start(1, services={"Echo": Echo()})
    assert list(m0.stream("Echo.count", 200, timeout=10)) == list(range(200))
    for x in m0.stream("Echo.forever", "ip-gen", timeout=10):
        if x == 3:
            break
    assert poll(lambda: m0.call("Echo.event", "ip-gen", timeout=10) == "closed")


def test_inprocess_exceptions(inproc):
    m0, = inproc.start(1, services={"Echo": Echo()})
    with pytest.raises(ValueError, match="in process") as info:
        m0.call("Echo.fail_value", "in process", timeout=10)
    assert "_deep_helper_raises" in "".join(traceback.format_exception(info.value))
    with pytest.raises(CustomError):
        m0.call("Echo.fail_custom", "x", timeout=10)
    with pytest.raises(bm.RemoteError) as info:
        m0.call("Echo.fail_bad_init", timeout=10)
    assert info.value.remote_type.endswith("BadInitError")
    with pytest.raises(bm.Error, match="Echo"):
        m0.call("Nope.x", timeout=10)
    with pytest.raises(bm.Error, match="pickle"):
        m0.call("Echo.echo", threading.Lock(), timeout=10)


def test_inprocess_timeout_cancels(inproc):
    m0, = inproc.start(1, services={"Echo": Echo()})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        m0.call("Echo.wait_cancel", "ip-sync", timeout=0.3)
    with pytest.raises(TimeoutError):
        m0.call("Echo.await_cancel", "ip-async", timeout=0.3)
    assert time.monotonic() - t0 < 2.5
    assert poll(lambda: m0.call("Echo.event", "ip-sync", timeout=10) == "cancelled")
    assert poll(lambda: m0.call("Echo.event", "ip-async", timeout=10) == "CancelledError")
    assert m0.call("Echo.echo", "usable", timeout=10) == "usable"


def test_inprocess_failing_init_and_shutdown():
    b = bm.start(bm.InProcess())
    try:
        with pytest.raises(CustomError, match="init refused"):
            b.start(1, services={"F": FailingInit()})
        m0, = b.start(1, services={"Echo": Echo()})
        assert m0.call("Echo.echo", 1, timeout=10) == 1
    finally:
        b.shutdown()
    b.shutdown()
    assert m0.state == bm.State.STOPPED
    with pytest.raises(bm.MachineLost):
        m0.call("Echo.echo", 1, timeout=5)
