"""What the build makes, and the socket calls of the connection core.

- Every compiled module is the one in use: the .pyx modules and the .py
  modules a .pxd declares (the connection core), whose classes are then
  extension types.
- The same .py sources, loaded as plain Python (their pure-Python twin, for
  a host that cannot compile), still make calls, streams and errors work.
- ``_sockio``'s receive and send behave as the socket module's methods do:
  errors, descriptors, a closed socket, a signal during a blocking receive.
"""
from __future__ import annotations

import glob
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from bigmachine import _compiled, _connection, _decoder, _reader, _role, _sockio, _writer

PACKAGE = os.path.dirname(_connection.__file__)
PYX = sorted("bigmachine." + os.path.basename(path)[:-4] for path in glob.glob(os.path.join(PACKAGE, "*.pyx")))
# The .py modules compiled through the .pxd beside them (setup.py's rule).
COMPILED_PY = sorted(set(_compiled.compiled_modules()) - set(PYX))


def test_every_compiled_module_is_in_use():
    assert {"bigmachine._connection", "bigmachine._reader", "bigmachine._role", "bigmachine._writer",
            "bigmachine._dispatch", "bigmachine._standby", "bigmachine._streams"} <= set(COMPILED_PY)
    assert {"bigmachine._wire", "bigmachine._decoder", "bigmachine._sockio"} <= set(PYX)
    assert set(_compiled.compiled_modules()) == set(COMPILED_PY + PYX)
    for name in COMPILED_PY + PYX:
        path = importlib.import_module(name).__file__
        assert path.endswith(".so"), path
    assert _compiled.running_as_python() == []
    assert _compiled.describe() == f"all {len(COMPILED_PY + PYX)} compiled modules in use"
    # Extension types: no instance __dict__, attributes in C slots.
    for cls in (_connection.Connection, _role.Role, _reader.Reader, _writer.Writer):
        assert "__dict__" not in dir(cls), cls
    assert type(_decoder.Decoder.feed).__name__ in ("method_descriptor", "cython_function_or_method")


# Loads the compiled .py modules from their sources, before bigmachine is imported.
PURE = textwrap.dedent("""
    import importlib.machinery, importlib.util, os, sys
    NAMES = set(sys.argv[1].split(","))
    class Sources:
        def find_spec(self, name, path=None, target=None):
            if name not in NAMES:
                return None
            source = os.path.join(path[0], name.rsplit(".", 1)[1] + ".py")
            return importlib.util.spec_from_loader(
                name, importlib.machinery.SourceFileLoader(name, source))
    sys.meta_path.insert(0, Sources())

    import asyncio
    import bigmachine as bm
    from tests.services import Echo
    for name in NAMES:
        assert sys.modules[name].__file__.endswith(".py"), sys.modules[name].__file__
    from bigmachine import _compiled
    assert sorted(_compiled.running_as_python()) == sorted(NAMES), _compiled.running_as_python()
    assert _compiled.describe().startswith("running as Python, not compiled: ")
    with bm.start(bm.InProcess()) as b:
        m, = b.start(1, services={"Echo": Echo()})
        assert m.call("Echo.echo", 41, timeout=30) == 41
        assert list(m.stream("Echo.count", 100, timeout=30)) == list(range(100))
        async def many():
            return await asyncio.gather(*(m.acall("Echo.echo", i, timeout=30) for i in range(200)),
                                        *(m.acall("Echo.aecho", i, timeout=30) for i in range(200)))
        assert asyncio.run(many()) == list(range(200)) * 2
        try:
            m.call("Echo.fail_value", "boom", timeout=30)
        except ValueError as exc:
            assert "boom" in str(exc)
        else:
            raise AssertionError("no error")
    print("pure ok")
""")


def test_the_sources_of_the_compiled_modules_run_as_pure_python():
    done = subprocess.run([sys.executable, "-c", PURE, ",".join(COMPILED_PY)], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(PACKAGE))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["pure", "ok"]


# ---- _sockio ----------------------------------------------------------------------


class FdSink:
    """Stands for the decoder: keeps what add_fds was given."""

    def __init__(self):
        self.calls = []

    def add_fds(self, fds, truncated):
        self.calls.append((fds, truncated))


def test_send_buffers_and_recv_into_move_the_bytes(unix_pair):
    a, b = unix_pair
    assert _sockio.send_buffers(a, [b"head", memoryview(b"er-"), bytearray(b"body")], None, 0) == 11
    buf = bytearray(64)
    assert _sockio.recv_into(b, buf) == 11
    assert bytes(buf[:11]) == b"header-body"
    many = [b"x"] * 100  # more buffers than live on the stack
    assert _sockio.send_buffers(a, many, None, 0) == 100
    assert _sockio.recv_into(b, buf) == 64 and _sockio.recv_into(b, buf) == 36


def test_descriptors_travel_and_arrive_close_on_exec(unix_pair):
    a, b = unix_pair
    r, w = os.pipe()
    try:
        assert _sockio.send_buffers(a, [b"m"], [r, w], 0) == 1
        sink = FdSink()
        assert _sockio.recv_into_with_fds(b, bytearray(8), sink) == 1
        [(fds, truncated)] = sink.calls
        assert len(fds) == 2 and not truncated
        try:
            assert not any(os.get_inheritable(fd) for fd in fds)
            os.write(fds[1], b"through the copy")
            assert os.read(r, 64) == b"through the copy"
        finally:
            for fd in fds:
                os.close(fd)
        # Without descriptors the decoder is not called.
        _sockio.send_buffers(a, [b"n"], None, 0)
        assert _sockio.recv_into_with_fds(b, bytearray(8), sink) == 1 and len(sink.calls) == 1
    finally:
        os.close(r)
        os.close(w)


def test_errors_are_the_socket_modules(unix_pair):
    a, b = unix_pair
    with pytest.raises(BlockingIOError):
        _sockio.recv_into(b, bytearray(8), socket.MSG_DONTWAIT)
    with pytest.raises(BufferError):
        _sockio.recv_into(b, b"read-only bytes")
    with pytest.raises(TypeError):
        _sockio.send_buffers(a, [b"ok", 12], None, 0)
    with pytest.raises(OSError, match="at most"):
        _sockio.send_buffers(a, [b""] * 1025, None, 0)
    a.close()
    assert _sockio.recv_into(b, bytearray(8)) == 0  # the peer closed: end of stream
    with pytest.raises(OSError) as closed:
        _sockio.send_buffers(a, [b"x"], None, 0)
    assert closed.value.errno == 9  # EBADF: a closed socket's number is never used
    b.close()
    with pytest.raises(OSError) as closed:
        _sockio.recv_into(b, bytearray(8))
    assert closed.value.errno == 9


def test_a_signal_during_a_blocking_receive_runs_its_handler_and_the_receive_goes_on(unix_pair):
    a, b = unix_pair
    caught = []
    previous = signal.signal(signal.SIGALRM, lambda *_: caught.append(True))
    sender = threading.Timer(0.3, a.send, args=(b"late",))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        sender.start()
        buf = bytearray(8)
        assert _sockio.recv_into(b, buf) == 4 and bytes(buf[:4]) == b"late"
        assert caught == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sender.cancel()


def test_a_handler_that_raises_ends_the_receive(unix_pair):
    a, b = unix_pair

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            _sockio.recv_into(b, bytearray(8))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)



def _host_check_script() -> str:
    """cache.py's CHECK, the script a host runs to see whether the bundle's
    extensions load there (cache.py runs main() on import, so it is read)."""
    import ast
    path = os.path.join(PACKAGE, "backends", "remote", "cache.py")
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHECK":
            return ast.literal_eval(node.value)
    raise AssertionError("no CHECK in cache.py")


def test_a_host_whose_compiled_py_modules_load_from_source_builds_them(tmp_path):
    # A bundle whose .pyx extensions load but whose compiled .py modules have no
    # extension for this Python (built for another one, or a build that made
    # only some): they import from source, and the host ran the connection
    # core as plain Python without a word.
    compiled_py = {name.rpartition(".")[2] for name in _compiled.compiled_modules()
                   if os.path.exists(os.path.join(PACKAGE, name.rpartition(".")[2] + ".pxd"))
                   and os.path.exists(os.path.join(PACKAGE, name.rpartition(".")[2] + ".py"))}
    assert "_connection" in compiled_py

    def leave_out(folder, names):
        return [n for n in names if n == "__pycache__" or n.endswith(".c")
                or (n.endswith(".so") and n.split(".")[0] in compiled_py)]

    shutil.copytree(PACKAGE, tmp_path / "bigmachine", ignore=leave_out)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    check = [sys.executable, "-c", _host_check_script(), "bigmachine._wire", "bigmachine._connection"]
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode != 0 and "bigmachine._connection is not compiled here" in done.stderr
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(PACKAGE))
    assert done.returncode == 0, done.stderr  # the real build passes
