"""Shared parts of the benchmarks: the raw-socket baseline server (a child
process), statistics and reporting (the Echo service is _echo's).

Run as a module (``python -m bigmachine.bench._common serve threads|asyncio [tls]``) it is the
raw baseline server: it prints its port on stdout and serves until stdin
closes. With ``tls`` it first reads one JSON line from stdin: its identity
(CA certificate, certificate, key; PEM) issued by a ``bigmachine._tls.ClusterCA``
the parent made, so the key never appears in argv, the environment or a file
of ours. It then speaks TLS 1.3 only and requires a client certificate from
that CA (the contexts of ``Identity.contexts()``, as bigmachine's), and serves
the same modes inside TLS.

Raw protocol, per connection: the client first sends a 4-byte mode, then
frames with the same 16-byte header as bigmachine's wire
(``u8 kind | u8 flags | u16 0 | u32 id | u64 length``):

- ``ECHO``: each frame (header + payload) is echoed back, one at a time.
- ``PIPE``: whatever complete frames have arrived are echoed back together
  (the server side of a pipelined client).
- ``SINK``: each frame's payload is received (``recv_into``) into a freshly
  allocated numpy array; the reply is a header whose length field is the
  byte count received. kind 2 resets the peak-RSS mark, kind 3 replies with
  16 bytes: peak RSS and current RSS (bytes).
- ``SRCE``: a frame asks for ``length`` bytes; the server sends a header and
  that many bytes from an array it made earlier (the first time per size).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any, Optional

from ._memory import rss_now, rss_peak, rss_reset

# The directory holding the bigmachine package, for child processes' PYTHONPATH.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict:
    """This environment with this bigmachine first on PYTHONPATH: a benchmark's child
    process then runs the same tree as the benchmark."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [_PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size  # 16
assert HEADER_SIZE == 16

# ---------------------------------------------------------------------------
# the raw baseline: a child process with plain blocking sockets


# Bulk bytes move in pieces of this size on both sides of the raw baseline:
# on these hosts one giant sendall/recv_into runs at ~3.1 GB/s, 1 MiB pieces
# at ~4.6 GB/s (measured), and the baseline should be the best raw sockets do.
RAW_CHUNK = 1 << 20


def recv_exact(sock: socket.socket, view: memoryview, chunk: int = RAW_CHUNK) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:got + chunk])
        if k == 0:
            raise EOFError
        got += k


def send_all(sock: socket.socket, view: memoryview, chunk: int = RAW_CHUNK) -> None:
    """sendall in pieces of chunk bytes (see RAW_CHUNK)."""
    for off in range(0, len(view), chunk):
        sock.sendall(view[off:off + chunk])


def _serve_conn(conn: socket.socket, ctx: Optional[ssl.SSLContext] = None) -> None:
    if conn.family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if ctx is not None:
            conn = ctx.wrap_socket(conn, server_side=True)  # handshake, client cert required
        mode = bytearray(4)
        recv_exact(conn, memoryview(mode))
        {b"ECHO": _echo, b"PIPE": _pipe, b"SINK": _sink, b"SRCE": _source}[bytes(mode)](conn)
    except (EOFError, ConnectionError, ssl.SSLError):
        pass
    finally:
        conn.close()


def _echo(conn: socket.socket) -> None:
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        recv_exact(conn, view[:16])
        n = HEADER.unpack_from(buf)[4]
        recv_exact(conn, view[16:16 + n])
        conn.sendall(view[:16 + n])


def _pipe(conn: socket.socket) -> None:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    start = end = 0
    while True:
        k = conn.recv_into(view[end:])
        if k == 0:
            return
        end += k
        pos = start
        while end - pos >= 16:
            n = HEADER.unpack_from(buf, pos)[4]
            if end - pos < 16 + n:
                break
            pos += 16 + n
        if pos > start:
            conn.sendall(view[start:pos])
            start = pos
        if start == end:
            start = end = 0
        elif len(buf) - end < 4096:
            buf[:end - start] = buf[start:end]
            end -= start
            start = 0


def _sink(conn: socket.socket) -> None:
    import numpy

    head = bytearray(16)
    while True:
        recv_exact(conn, memoryview(head))
        kind, _, _, sid, n = HEADER.unpack(head)
        if kind == 2:
            rss_reset()
            conn.sendall(HEADER.pack(2, 0, 0, sid, 0))
            continue
        if kind == 3:
            conn.sendall(HEADER.pack(3, 0, 0, sid, 16) + struct.pack("<QQ", rss_peak(), rss_now()))
            continue
        a = numpy.empty(n // 8, dtype=numpy.float64)  # fresh, like a receiver must
        recv_exact(conn, memoryview(a).cast("B"))
        conn.sendall(HEADER.pack(1, 0, 0, sid, a.nbytes) + struct.pack("<d", a[-1] if len(a) else 0.0))
        del a


def _source(conn: socket.socket) -> None:
    import numpy

    arrays: dict = {}
    head = bytearray(16)
    while True:
        recv_exact(conn, memoryview(head))
        _, _, _, sid, n = HEADER.unpack(head)
        a = arrays.get(n)
        if a is None:
            arrays.clear()
            a = arrays[n] = numpy.arange(n // 8, dtype=numpy.float64)
        conn.sendall(HEADER.pack(1, 0, 0, sid, n))
        send_all(conn, memoryview(a).cast("B"))


def _read_tls_context() -> ssl.SSLContext:
    """The server context from the identity the parent writes as one JSON line on stdin."""
    from bigmachine._tls import Identity

    identity = Identity.from_dict(json.loads(sys.stdin.readline()))
    return identity.contexts()[0]


def _serve_threads(ctx: Optional[ssl.SSLContext] = None, unix: Optional[str] = None) -> None:
    """unix: serve on a Unix socket at this path instead of loopback TCP."""
    if unix:
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(unix)
        lst.listen(64)
        print(0, flush=True)
    else:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen(64)
        print(lst.getsockname()[1], flush=True)

    def accept() -> None:
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=_serve_conn, args=(conn, ctx), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the parent goes away


def _serve_asyncio(ctx: Optional[ssl.SSLContext] = None) -> None:
    """A bare asyncio echo server (Protocol, header parsing) for the ECHO mode.

    With ctx, asyncio's own TLS (its SSL protocol over memory BIOs).
    """
    import asyncio

    class P(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = bytearray()
            self.moded = False
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            if not self.moded:
                if len(buf) < 4:
                    return
                del buf[:4]
                self.moded = True
            pos = 0
            while len(buf) - pos >= 16:
                n = HEADER.unpack_from(buf, pos)[4]
                if len(buf) - pos < 16 + n:
                    break
                pos += 16 + n
            if pos:
                self.t.write(bytes(buf[:pos]))
                del buf[:pos]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(P, "127.0.0.1", 0, ssl=ctx)
        print(server.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


class RawServer:
    """The raw baseline server, in a child process of this one.

    tls=True: a fresh ``bigmachine._tls.ClusterCA`` issues the server and this
    client an identity each; the server's reaches the child through its stdin
    pipe. Connections are then TLS 1.3 with mutual certificate verification,
    with the same contexts bigmachine uses (``Identity.contexts()``).
    unix=True (threads only): a Unix socket in a fresh private directory
    instead of loopback TCP, like bigmachine's links on one host.
    """

    def __init__(self, kind: str = "threads", tls: bool = False, unix: bool = False):
        self.tls = tls
        self.unix = os.path.join(tempfile.mkdtemp(prefix="bench-"), "raw.sock") if unix else None
        self.client_ctx: Optional[ssl.SSLContext] = None
        server_identity = None
        if tls:
            from bigmachine._tls import ClusterCA

            ca = ClusterCA()
            server_identity = ca.issue("raw-server")
            self.client_ctx = ca.issue("raw-client").contexts()[1]
        argv = ([sys.executable, "-m", "bigmachine.bench._common", "serve", kind] + (["tls"] if tls else [])
                + (["unix", self.unix] if unix else []))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=child_env())
        try:
            if server_identity is not None:
                self.proc.stdin.write(json.dumps(server_identity.to_dict()).encode() + b"\n")
                self.proc.stdin.flush()
            self.port = int(self.proc.stdout.readline())
        except BaseException:
            self.close()
            raise

    def connect(self, mode: bytes) -> socket.socket:
        if self.unix:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.unix)
            s.sendall(mode)
            return s
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.client_ctx is not None:
            s = self.client_ctx.wrap_socket(s)  # handshake; the server's cert must chain to the CA
            assert s.version() == "TLSv1.3", s.version()
        s.sendall(mode)
        return s

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.unix:
            shutil.rmtree(os.path.dirname(self.unix), ignore_errors=True)

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------
# statistics and reporting


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process pid has used, in clock ticks (10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pct(values: list, q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: list) -> float:
    return statistics.median(values) if values else float("nan")


def implementation() -> dict:
    import bigmachine
    import bigmachine._compiled
    import bigmachine._decoder
    import bigmachine._wire

    info = {"bigmachine": os.path.dirname(bigmachine.__file__),
            "wire": bigmachine._wire.__file__,
            "decoder": bigmachine._decoder.__file__,
            "build": bigmachine._compiled.describe(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "bytecode_cached": bytecode_cached()}
    try:
        root = os.path.dirname(info["bigmachine"])
        info["git"] = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return info


def bytecode_cached() -> bool:
    """Whether every bigmachine module loaded so far has up-to-date cached bytecode, as an
    installed package has; in a source checkout with PYTHONDONTWRITEBYTECODE set, every new
    process (machines, the template) compiles bigmachine again unless the build cached it."""
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None) or ""
        if not (module.__name__.startswith("bigmachine") and source.endswith(".py")):
            continue
        cached = getattr(module, "__cached__", None)
        if not cached or not os.path.exists(cached) or \
                os.path.getmtime(cached) < os.path.getmtime(source):
            return False
    return True


def print_header(title: str) -> dict:
    info = implementation()
    print(f"== {title}")
    print(f"implementation: bigmachine._wire = {info['wire']}, _decoder = {info['decoder']}; "
          f"{info['build']}")
    print(f"  git {info.get('git', '?')}, python {info['python']}, {info['cpus']} cpus, "
          f"load {' '.join(f'{x:.2f}' for x in info['loadavg'])}")
    if not info["bytecode_cached"]:
        print("  bigmachine's bytecode is not cached: every new process compiles it "
              "(python setup.py build_ext --inplace caches it)")
    return info


def json_arg(argv: Optional[list] = None) -> tuple[Optional[str], list]:
    """Split --json PATH off the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    if "--json" in argv:
        i = argv.index("--json")
        path = argv[i + 1]
        del argv[i:i + 2]
    return path, argv


def write_json(path: Optional[str], data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=float)
        print(f"figures written to {path}")


def tls_description(sock: socket.socket) -> str:
    """Protocol and cipher of a connected raw TLS socket, for the report."""
    if not isinstance(sock, ssl.SSLSocket):
        return "plain TCP"
    name, _, bits = sock.cipher()
    return f"{sock.version()} {name} ({bits}-bit), mutual certificate verification"


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "serve":
    kind = sys.argv[2] if len(sys.argv) > 2 else "threads"
    rest = sys.argv[3:]
    ctx = _read_tls_context() if "tls" in rest else None
    unix_path = rest[rest.index("unix") + 1] if "unix" in rest else None
    _serve_asyncio(ctx) if kind == "asyncio" else _serve_threads(ctx, unix_path)
