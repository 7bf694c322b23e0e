"""Real parts for the EC2 tests: a moto server, a network no packet leaves, and a
boot harness that runs each instance's user-data as cloud-init would.

- `Moto`: ``moto.server.ThreadedMotoServer`` on 127.0.0.1, reached by boto3
  through endpoint_url, with fake credentials in the environment and
  AWS_EC2_METADATA_DISABLED=true (nothing asks the metadata address).
- `Net`: a /16 this host does not route (checked with ``ip route``/``ip
  addr``), given an ``unreachable`` route before anything launches, with a
  bridge holding the driver's address 10.R.0.1/32. The VPC and its subnet
  10.R.1.0/24 are made in moto in that range (never moto's default VPC).
- `Harness`: a thread watches moto. Each new instance's user-data is read
  back from moto and run as root, as cloud-init would, in its own network
  namespace holding the instance's private address (a veth on the bridge,
  a /32 route to it from this host) and its own mount and PID namespaces,
  with private overlays on /tmp, /etc, /var and /root: nothing it does
  reaches the host. ``poweroff``, ``shutdown`` and ``halt`` on its PATH ask
  the harness, which terminates the instance in moto; an instance terminated
  in moto loses its namespace (its processes die, its route goes).
- `FaultProxy`: an HTTP proxy in front of moto that answers chosen
  RunInstances requests with an EC2 error (capacity, quota).

The tests use address="private" only: moto invents public addresses, and no
packet may go to one. Everything needs root and iproute2; without them the
tests fail, they never skip.
"""
from __future__ import annotations

import base64
import fcntl
import gzip
import http.server
import itertools
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from tests import sshd as sshd_fixture

REGION = "us-east-1"
LOCK = "/run/bmtest-ec2.lock"  # held while a run picks its range and makes its bridge
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

# PID 1 of an instance: private overlays, the user-data as cloud-init runs it, reaping.
INIT = r"""
import os, shutil, subprocess, sys, time
d = sys.argv[1]
priv = d + "/priv"
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=700", "tmpfs", priv], check=True)
for top in ("tmp", "etc", "var", "root"):
    up, work = "%s/%s.up" % (priv, top), "%s/%s.work" % (priv, top)
    os.makedirs(up)
    os.makedirs(work)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    "lowerdir=/%s,upperdir=%s,workdir=%s" % (top, up, work), "/" + top],
                   check=True)
script = "/var/lib/cloud/instance/scripts/part-001"
os.makedirs(os.path.dirname(script), exist_ok=True)
shutil.copy(d + "/user-data", script)
os.chmod(script, 0o700)
env = {"PATH": d + "/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "HOME": "/root", "LANG": "C.UTF-8"}
subprocess.Popen([script], env=env, cwd="/")
print("harness: user-data started", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""
SHIM = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> {marker}\n"


def run(*argv: str, timeout: float = 10.0) -> str:
    return sshd_fixture._run(list(argv), timeout=timeout).stdout


class Moto:
    """A moto server on loopback, and boto3 clients of it."""

    def __init__(self) -> None:
        os.environ.update(ENV)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def ec2(self):
        import boto3

        return boto3.client("ec2", endpoint_url=self.url, region_name=REGION)

    def stop(self) -> None:
        self.server.stop()


class Box:
    """One booted instance: its namespace, its PID 1, its files on the host."""

    def __init__(self, harness: "Harness", instance_id: str, ip: str, user_data: bytes):
        self.harness = harness
        self.id = instance_id
        self.ip = ip
        n = next(harness.counter)
        self.ns = f"bmec2-{harness.id}-{os.getpid()}-{n}"
        self.outer, self.inner = f"be{harness.id}{n}a", f"be{harness.id}{n}b"
        self.dir = harness.root / str(n)
        self.marker = self.dir / "poweroff"
        self.proc: Optional[subprocess.Popen] = None
        self.killed = False
        self.booted_at = time.monotonic()
        (self.dir / "bin").mkdir(parents=True)
        (self.dir / "priv").mkdir()
        (self.dir / "user-data").write_bytes(user_data)
        for name in ("poweroff", "shutdown", "halt"):
            shim = self.dir / "bin" / name
            shim.write_text(SHIM.format(marker=self.marker))
            shim.chmod(0o755)

    def boot(self) -> None:
        h = self.harness
        run("ip", "netns", "add", self.ns)
        run("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        run("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner,
            "netns", self.ns)
        run("ip", "link", "set", self.outer, "addrgenmode", "none")
        run("ip", "link", "set", self.outer, "master", h.bridge)
        run("ip", "link", "set", self.outer, "up")
        inside = ("ip", "netns", "exec", self.ns, "ip")
        run(*inside, "link", "set", self.inner, "addrgenmode", "none")
        run(*inside, "addr", "add", f"{self.ip}/24", "dev", self.inner)
        run(*inside, "link", "set", self.inner, "up")
        run(*inside, "route", "add", f"{h.driver_ip}/32", "dev", self.inner)
        run("ip", "route", "add", f"{self.ip}/32", "dev", h.bridge, "src", h.driver_ip)
        self.console = open(self.dir / "console.log", "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--pid", "--fork",
             "--mount-proc", "--propagation", "private", sys.executable, "-c", INIT,
             str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT,
            start_new_session=True)

    def powered_off(self) -> bool:
        return self.marker.exists()

    def kill(self) -> None:
        """The instance is gone: its processes die, its address is unreachable again."""
        if self.killed:
            return
        self.killed = True
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            self.console.close()
        subprocess.run(["ip", "route", "del", f"{self.ip}/32"], capture_output=True, timeout=10)
        if os.path.exists(f"/run/netns/{self.ns}"):
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=10)

    def console_text(self) -> str:
        try:
            return (self.dir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def agent_log(self) -> str:
        """The agent's log, read inside the instance's mount namespace."""
        import psutil

        if self.proc is None or self.killed:
            return ""
        children = psutil.Process(self.proc.pid).children()  # PID 1, once unshare forked
        if not children:
            return ""
        done = subprocess.run(["nsenter", "-t", str(children[0].pid), "-m", "cat",
                               "/var/lib/bigmachine/agent.log"], capture_output=True, text=True)
        return done.stdout


class Harness:
    """Moto, the unrouted network, and the thread that boots and ends instances."""

    def __init__(self) -> None:
        self.id = secrets.token_hex(3)
        # Not under /tmp: an instance lays its own /tmp over it.
        self.root = Path(f"/run/bmec2-{self.id}-{os.getpid()}")
        self.bridge = f"be{self.id}br"
        self.counter = itertools.count()
        self.boxes: dict[str, Box] = {}
        self.replays: list[Box] = []
        self.hold = False  # while True, new instances wait unbooted
        self.unbootable = 0  # this many of the next new instances never boot
        self.skipped: set = set()  # the instances left unbooted on purpose
        self.errors: list[str] = []
        self.prefix = ""
        self.route_made = self.bridge_made = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.moto: Optional[Moto] = None

    # ---- building

    def start(self) -> None:
        assert os.geteuid() == 0, "the EC2 tests must run as root (namespaces, routes)"
        for tool in ("ip", "unshare", "nsenter"):
            assert shutil.which(tool), f"{tool} is missing: install iproute2 and util-linux"
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._remove_stale()
            used = run("ip", "-4", "route", "show", "table", "all") + run("ip", "-4", "addr")
            taken = set(re.findall(r"\b10\.(\d+)\.", used))
            free = [n for n in range(200, 251) if str(n) not in taken]
            assert free, "no free 10.N.0.0/16 range left for the EC2 tests"
            self.prefix = f"10.{random.choice(free)}"
            # Before anything launches: the whole range is unreachable from here.
            run("ip", "route", "add", "unreachable", f"{self.prefix}.0.0/16")
            self.route_made = True
            run("ip", "link", "add", self.bridge, "type", "bridge")
            self.bridge_made = True
            run("ip", "link", "set", self.bridge, "addrgenmode", "none")
            run("ip", "addr", "add", f"{self.driver_ip}/32", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
        self.root.mkdir(mode=0o700)
        self.moto = Moto()
        ec2 = self.moto.ec2()
        self.vpc = ec2.create_vpc(CidrBlock=f"{self.prefix}.0.0/16")["Vpc"]["VpcId"]
        self.subnet = ec2.create_subnet(VpcId=self.vpc, CidrBlock=f"{self.prefix}.1.0/24",
                                        AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
        images = ec2.describe_images(Owners=["amazon"])["Images"]
        self.ami = next(i["ImageId"] for i in images if i.get("Architecture") == "x86_64")
        self._thread = threading.Thread(target=self._watch, daemon=True, name="ec2-harness")
        self._thread.start()

    @property
    def driver_ip(self) -> str:
        return f"{self.prefix}.0.1"

    @property
    def url(self) -> str:
        return self.moto.url

    def ec2(self):
        return self.moto.ec2()

    def _remove_stale(self) -> None:
        """Namespaces and bridges of earlier runs whose pytest died unfinished."""
        import psutil

        for ns in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
            m = re.fullmatch(r"bmec2-([0-9a-f]{6})-(\d+)-\d+", ns)
            if not m or psutil.pid_exists(int(m[2])):
                continue
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", f"be{m[1]}br"], capture_output=True,
                           timeout=10)
            shutil.rmtree(f"/run/bmec2-{m[1]}-{m[2]}", ignore_errors=True)

    # ---- the watcher

    def _watch(self) -> None:
        ec2 = self.ec2()
        while not self._stop.wait(0.1):
            try:
                self._step(ec2)
            except Exception as exc:  # reported by the tests' teardown
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _step(self, ec2) -> None:
        reply = ec2.describe_instances(Filters=[{"Name": "vpc-id", "Values": [self.vpc]}])
        for reservation in reply["Reservations"]:
            for d in reservation["Instances"]:
                iid, state = d["InstanceId"], d["State"]["Name"]
                box = self.boxes.get(iid)
                if box is None and iid in self.skipped:
                    continue
                if box is None and state in ("pending", "running") and self.unbootable:
                    self.unbootable -= 1
                    self.skipped.add(iid)
                    continue
                if box is None and state in ("pending", "running") and not self.hold:
                    data = ec2.describe_instance_attribute(
                        InstanceId=iid, Attribute="userData")["UserData"].get("Value", "")
                    box = Box(self, iid, d["PrivateIpAddress"], decode(data))
                    self.boxes[iid] = box
                    box.boot()
                elif box is not None and state in ("shutting-down", "terminated"):
                    box.kill()
        for box in list(self.boxes.values()):
            if box.powered_off() and not box.killed:
                ec2.terminate_instances(InstanceIds=[box.id])  # shutdown behaviour: terminate
                box.kill()

    # ---- for tests

    def replay(self, instance_id: str, ip: str) -> Box:
        """Run an instance's user-data again in a new namespace at ip."""
        data = self.ec2().describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
        box = Box(self, f"replay-of-{instance_id}", ip, decode(data))
        self.replays.append(box)
        box.boot()
        return box

    def instances(self, states=("pending", "running")) -> list[dict]:
        reply = self.ec2().describe_instances(Filters=[
            {"Name": "vpc-id", "Values": [self.vpc]},
            {"Name": "instance-state-name", "Values": list(states)}])
        return [d for r in reply["Reservations"] for d in r["Instances"]]

    def stop(self) -> list[str]:
        errors = list(self.errors)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for box in list(self.boxes.values()) + self.replays:
            try:
                box.kill()
            except Exception as exc:
                errors.append(f"{box.ns}: {exc}")
        if self.bridge_made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)
        if self.route_made:
            subprocess.run(["ip", "route", "del", "unreachable", f"{self.prefix}.0.0/16"],
                           capture_output=True, timeout=10)
        if self.moto is not None:
            self.moto.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        return errors


def decode(value: str) -> bytes:
    data = base64.b64decode(value)
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


class FaultProxy:
    """An HTTP proxy in front of moto that fails the RunInstances requests `fail` picks.

    fail(params) -> an EC2 error code, or None to pass the request on.
    """

    def __init__(self, target: str, fail: Callable[[dict], Optional[str]]):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                code = fail(params) if params.get("Action") == "RunInstances" else None
                if code:
                    proxy.failed.append(code)
                    self._answer(400, (
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
                        f"<Code>{code}</Code><Message>{code} (injected by the test proxy)"
                        "</Message></Error></Errors><RequestID>test</RequestID></Response>"
                    ).encode(), "text/xml")
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                request = urllib.request.Request(target + self.path, data=body,
                                                 headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        self._answer(reply.status, reply.read(),
                                     reply.headers.get("Content-Type", "text/xml"))
                except urllib.error.HTTPError as exc:
                    self._answer(exc.code, exc.read(),
                                 exc.headers.get("Content-Type", "text/xml"))

            def _answer(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.failed: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="ec2-fault-proxy")
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
