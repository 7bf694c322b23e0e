#!/bin/sh
# bigmachine: the user-data of an EC2 instance, made by its driver.
#
# It holds no cluster secret and no long-lived key: only a one-time TLS key
# for the agent below and the sha256 of a one-time token. The agent accepts
# its driver once (the first to send that token, before boot_timeout), then
# nothing more; it powers the instance off when its machines are done, or at
# boot_timeout if no driver came. Nothing here dials out.
umask 077
dir=/var/lib/bigmachine
mkdir -p /var/lib
if ! mkdir "$dir"; then
    echo "bigmachine: $dir exists: an agent ran here before; powering off" >&2
    poweroff || shutdown -h now || halt -p
    exit 1
fi
ulimit -n 1048576 2>/dev/null || ulimit -n 65536 2>/dev/null || true
cat >"$dir/setup.sh" <<'BIGMACHINE_SETUP'
apt-get install -y python3-numpy
BIGMACHINE_SETUP
cat >"$dir/agent.py" <<'BIGMACHINE_AGENT'
"""bigmachine's bootstrap agent on an EC2 instance, started by its user-data.

Usage: python3 ec2_agent.py DIR < CONFIG, CONFIG one JSON line: port,
boot_timeout, key and cert (its one-time TLS identity), token_sha256. It runs
DIR/setup.sh, listens with TLS 1.3 on PORT and accepts one driver: the first
to send the token whose sha256 it was given, before boot_timeout. It then
stops listening and serves that driver alone: "run" (a command, for the
host's cache), "start" (a machine, whose output goes back), "kill". After
boot_timeout it starts nothing more. It powers the instance off once no
machine runs and the driver's link is closed or boot_timeout has passed.
It dials nothing. Frames, both ways: JSON length and data length (big-endian
u32 each), the JSON, the data.
"""
import hashlib, hmac, json, os, signal, socket, ssl, struct, subprocess, sys, threading, time

HEAD = struct.Struct(">II")
MAX_JSON, MAX_DATA, RECV = 1 << 20, 1 << 30, 1 << 16
HELLO_JSON = 4096  # what a peer may send before it has proved itself: a hello, no data


def log(text):
    sys.stderr.write("%s bigmachine agent: %s\n" % (time.strftime("%H:%M:%S"), text))
    sys.stderr.flush()


class Link:
    """TLS through memory BIOs: one reader thread, writers under a lock."""

    def __init__(self, ctx, sock):
        self.sock, self.buf, self.closed = sock, bytearray(), False
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.lock = threading.Lock()  # over obj and the socket's sends

    def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.fill()
        self.flush()

    def flush(self):
        with self.lock:
            data = self.out.read()
            if data:
                self.sock.sendall(data)

    def fill(self):
        data = self.sock.recv(RECV)
        if not data:
            raise EOFError("the driver closed its link")
        self.inc.write(data)

    def read(self, n):
        while len(self.buf) < n:
            with self.lock:
                try:
                    chunk = self.obj.read(RECV)
                except ssl.SSLWantReadError:
                    chunk = None
                except ssl.SSLZeroReturnError:
                    chunk = b""
            if chunk is None:
                self.flush()  # what OpenSSL answered while reading (a key update)
                self.fill()
            elif not chunk:
                raise EOFError("the driver closed its link")
            else:
                self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def recv(self, max_json=MAX_JSON, max_data=MAX_DATA):
        size, length = HEAD.unpack(self.read(HEAD.size))
        if size > max_json or length > max_data:
            raise ValueError("a frame of %d + %d bytes is too large" % (size, length))
        return json.loads(self.read(size).decode()), self.read(length)

    def send(self, msg, data=b""):
        body = json.dumps(msg).encode()
        with self.lock:
            if self.closed:
                return
            self.obj.write(HEAD.pack(len(body), len(data)) + body)
            if data:
                self.obj.write(data)
            try:
                self.sock.sendall(self.out.read())
            except OSError:
                self.closed = True

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def tls_context(config):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    fds = []
    try:  # OpenSSL reads paths: the key stays in memory (memfd), never on disk
        for pem in (config["cert"], config["key"]):
            fds.append(os.memfd_create("bigmachine-agent", os.MFD_CLOEXEC))
            os.write(fds[-1], pem.encode())
        ctx.load_cert_chain("/proc/self/fd/%d" % fds[0], "/proc/self/fd/%d" % fds[1])
    finally:
        for fd in fds:
            os.close(fd)
    return ctx


class Agent:
    def __init__(self, root, config):
        self.root = root
        self.deadline = time.monotonic() + config["boot_timeout"]
        self.port = config["port"]
        self.token_hash = bytes.fromhex(config["token_sha256"])
        self.ctx = tls_context(config)
        self.cond = threading.Condition()
        self.link = None  # the driver's, once one proved itself
        self.machines = {}  # name -> Popen
        self.setup = None  # {"status", "tail"} once setup.sh has run
        threading.Thread(target=self.run_setup, daemon=True).start()

    def run_setup(self):
        path = os.path.join(self.root, "setup.log")
        with open(path, "wb") as out:
            status = subprocess.call(["/bin/sh", os.path.join(self.root, "setup.sh")],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        with open(path, "rb") as f:
            tail = f.read()[-4000:].decode("utf-8", "replace")
        with self.cond:
            self.setup = {"status": status, "tail": tail}
            self.cond.notify_all()

    def late(self):
        return time.monotonic() > self.deadline

    def serve(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", self.port))
        listener.listen(16)
        listener.settimeout(0.2)
        log("listening on port %d" % self.port)
        while self.link is None and not self.late():
            try:
                sock, peer = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self.greet, args=(sock, peer), daemon=True).start()
        listener.close()  # one driver, once: nothing else is accepted
        with self.cond:
            while self.machines or not (self.late() or self.link is None or self.link.closed):
                self.cond.wait(0.5)
        why = "boot_timeout passed" if self.link is None else "its machines are done"
        log("powering off: %s" % why)
        for argv in (["poweroff"], ["shutdown", "-h", "now"], ["halt", "-p"]):
            try:
                if subprocess.call(argv) == 0:
                    return
            except OSError:
                pass

    def greet(self, sock, peer):
        try:
            sock.settimeout(10.0)
            link = Link(self.ctx, sock)
            link.handshake()
            msg, _ = link.recv(HELLO_JSON, 0)  # before the token: no more than a hello
            given = bytes.fromhex(msg.get("token", "")) if msg.get("op") == "hello" else b""
            good = hmac.compare_digest(hashlib.sha256(given).digest(), self.token_hash)
            with self.cond:
                good = good and self.link is None and not self.late()
                if good:
                    self.link = link
                    self.cond.notify_all()
        except (OSError, EOFError, ValueError, ssl.SSLError) as exc:
            log("refused %s: %s" % (peer[0], exc))
            sock.close()
            return
        if not good:
            log("refused %s: not the driver's token, or too late" % peer[0])
            link.close()
            return
        log("accepted the driver at %s" % peer[0])
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self.cond:
            self.cond.wait_for(lambda: self.setup is not None, self.deadline - time.monotonic())
        link.send({"op": "hello", "setup": self.setup, "late": self.late()})
        try:
            while True:
                msg, data = link.recv()
                if msg["op"] == "kill":
                    self.kill(msg["name"])
                elif self.late():
                    link.send({"id": msg["id"], "error": "the agent's boot_timeout passed"})
                elif msg["op"] == "run":
                    threading.Thread(target=self.run, args=(link, msg, data), daemon=True).start()
                elif msg["op"] == "start":
                    self.start(link, msg, data)
        except (OSError, EOFError, ValueError, KeyError, ssl.SSLError) as exc:
            log("the driver's link ended: %s" % (exc,))
        with self.cond:
            link.closed = True
            self.cond.notify_all()

    def run(self, link, msg, data):
        try:
            done = subprocess.run(msg["argv"], input=data, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
            status, out, err = done.returncode, done.stdout, done.stderr
        except OSError as exc:
            status, out, err = 127, b"", str(exc).encode()
        link.send({"id": msg["id"], "status": status, "out": len(out)}, out + err)

    def start(self, link, msg, data):
        name, cwd = msg["name"], msg["cwd"]
        try:
            os.makedirs(os.path.join(cwd, "tmp"), mode=0o700, exist_ok=True)
            proc = subprocess.Popen(msg["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=cwd, start_new_session=True,
                                    env=dict(os.environ, **msg["env"]))
        except OSError as exc:
            link.send({"id": msg["id"], "error": "cannot start %s: %s" % (msg["argv"][0], exc)})
            return
        with self.cond:
            self.machines[name] = proc
        pumps = [threading.Thread(target=self.pump, args=(link, name, f, fd), daemon=True)
                 for f, fd in ((proc.stdout, 1), (proc.stderr, 2))]
        for pump in pumps:
            pump.start()
        try:
            proc.stdin.write(data)  # its bootstrap
            proc.stdin.close()
        except OSError:
            pass
        link.send({"id": msg["id"], "pid": proc.pid})
        threading.Thread(target=self.reap, args=(link, name, proc, pumps), daemon=True).start()

    def pump(self, link, name, stream, fd):
        for chunk in iter(lambda: os.read(stream.fileno(), RECV), b""):
            link.send({"op": "out", "name": name, "fd": fd}, chunk)

    def reap(self, link, name, proc, pumps):
        status = proc.wait()
        for pump in pumps:
            pump.join(5.0)
        link.send({"op": "exit", "name": name, "status": status})
        with self.cond:
            del self.machines[name]
            self.cond.notify_all()

    def kill(self, name):
        proc = self.machines.get(name)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    Agent(sys.argv[1], json.loads(sys.stdin.readline())).serve()
BIGMACHINE_AGENT
setsid python3 "$dir/agent.py" "$dir" >"$dir/agent.log" 2>&1 <<'BIGMACHINE_CONFIG' &
{"port": 7950, "boot_timeout": 600, "cert": "<ONE-TIME CERT>", "key": "<ONE-TIME KEY>", "token_sha256": "<HASH>"}
BIGMACHINE_CONFIG
