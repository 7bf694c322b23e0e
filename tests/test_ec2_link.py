"""The driver's link to an EC2 instance's agent (backends/ec2/link.py) against the
agent's real server side (backends/remote/ec2_agent.py), on loopback: no AWS needed."""
from __future__ import annotations

import hashlib
import importlib.util
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import bigmachine as bm
from bigmachine.backends.ec2.link import AgentLink
from bigmachine.backends.ec2.userdata import OneTime
from tests.test_transport import run_in_thread

pytestmark = pytest.mark.timeout(90)


def _agent_module():
    """remote/ec2_agent.py (a script the instances run), for its server side of the link."""
    path = Path(bm.__file__).parent / "backends" / "remote" / "ec2_agent.py"
    spec = importlib.util.spec_from_file_location("_review_ec2_agent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _stalling_agent(answer_hello: bool):
    """A real agent server (ec2_agent.py's Link) on loopback that takes one driver's
    hello, answers it only if answer_hello, then reads nothing more until the block
    ends; yields (its OneTime, its port)."""
    agent = _agent_module()
    one = OneTime.generate(60)
    ctx = agent.tls_context({"cert": one.cert_pem.decode(), "key": one.key_pem.decode()})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    release = threading.Event()

    def serve():
        sock, _ = listener.accept()
        sock.settimeout(30)
        server = agent.Link(ctx, sock)
        server.handshake()
        server.recv()  # the driver's hello and token
        if answer_hello:
            server.send({"op": "hello", "setup": {"status": 0, "tail": ""}, "late": False})
        release.wait(60)  # and now nothing is read
        server.close()

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    try:
        yield one, listener.getsockname()[1]
    finally:
        release.set()
        server_thread.join(10)
        listener.close()


def test_a_send_to_an_agent_that_stops_reading_is_bounded_by_the_deadline():
    # An agent accepts the driver, answers hello, then reads nothing more, as an
    # instance whose network stalls mid-upload does. AgentLink._send did a blocking
    # sendall with no timeout: link.run(..., deadline) never returned, and the
    # bundles' upload ignored b.start's timeout.
    with _stalling_agent(answer_hello=True) as (one, port):
        link = AgentLink.open("i-review (127.0.0.1)", "127.0.0.1", port, one,
                              time.monotonic() + 10, 10, threading.Event())
        thread, box = run_in_thread(link.run, ["true"], bytes(64 << 20), time.monotonic() + 2)
        try:
            thread.join(15)
            hung = thread.is_alive()
        finally:
            link.close()
            thread.join(10)
    assert not hung, "link.run with a 2 s deadline still sending after 15 s"
    assert isinstance(box.get("error"), bm.Error), box


def test_an_agent_that_never_answers_hello_leaves_no_link_behind():
    # The agent answers hello only once its setup= has run; the driver's deadline (taken
    # at launch) passes first when setup is slow. AgentLink.open then raised, but left
    # its socket open and its reader thread running: nothing could close them (booted.link
    # was never set), so each such instance cost the driver a thread and a connection.
    with _stalling_agent(answer_hello=False) as (one, port):
        with pytest.raises(bm.Error, match="did not answer hello in time"):
            AgentLink.open("i-slowsetup (127.0.0.1)", "127.0.0.1", port, one,
                           time.monotonic() + 2, 2, threading.Event())
        time.sleep(1.0)
        readers = [t.name for t in threading.enumerate()
                   if t.name == "bigmachine-ec2-agent-i-slowsetup" and t.is_alive()]
    assert not readers, f"the failed link's reader thread still runs: {readers}"


def test_the_agent_bounds_what_a_peer_sends_before_it_proved_itself():
    # Before the token is checked, the agent reads a whole frame of up to MAX_DATA (1 GiB)
    # into memory: any peer that reaches its port (a VPC neighbour, a wide security group
    # passed in security_groups=) can make it buffer that much, pre-auth. A hello carries
    # no data: a frame with data, before the token, should be refused at its header.
    agent = _agent_module()
    one = OneTime.generate(60)
    server = agent.Agent.__new__(agent.Agent)  # greet() alone: no setup, no listener
    server.ctx = agent.tls_context({"cert": one.cert_pem.decode(),
                                    "key": one.key_pem.decode()})
    server.token_hash = hashlib.sha256(one.token).digest()
    server.cond = threading.Condition()
    server.link = None
    server.deadline = time.monotonic() + 60
    a, b = socket.socketpair()
    greeter = threading.Thread(target=server.greet, args=(a, ("192.0.2.9", 1)), daemon=True)
    greeter.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    total = 200 << 20
    sent = 0
    try:
        b.settimeout(10)
        tls = ctx.wrap_socket(b)
        body = b'{"op": "hello", "token": ""}'
        tls.sendall(agent.HEAD.pack(len(body), total) + body)
        chunk = bytes(1 << 20)
        while sent < total:
            tls.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the agent dropped us: what should happen early
    finally:
        b.close()
        greeter.join(15)
    assert sent < (16 << 20), f"the agent took {sent >> 20} MiB from a peer with no token"
