"""The SSH system: places machines on hosts, ships their code, starts them."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import uuid
from typing import Any, Iterable, Optional, Sequence, Union

from ..._auth import Credentials
from ...errors import Error
from .. import System
from .._bootstrap import PID_PREFIX, bootstrap
from .._bundle import DEFAULT_EXCLUDE, Bundle, user_bundle, user_paths
from .._hostprep import Plan, prepare
from .._hostprep import run_dir as machine_dir
from .._packages import Packages, PackagesArg
from .._shell import exports, join, python_argv
from .hosts import Host, exec_command, open_session, parse_host
from .probe import bind_address
from .process import SSHProcess

log = logging.getLogger("bigmachine.ssh")


class SSH(System):
    """Machines as processes on SSH hosts (paramiko).

    hosts: "host", "user@host", "host:port" or "user@[v6addr]:port" strings.
    user, port: defaults for hosts that do not say (user: the local user).
    key_filename: a private key file (or a list of them); None tries ~/.ssh/id_*.
    agent: also offer the keys of the ssh agent at SSH_AUTH_SOCK.
    known_hosts: an OpenSSH known_hosts file (default ~/.ssh/known_hosts);
        entries for non-22 ports are looked up as ``[host]:port``, hashed
        entries are understood. A host whose key is not there is refused
        unless accept_new_hosts, which appends it; a host whose key differs
        from the recorded one is always refused (bigmachine.AuthError).
    python: the command that runs Python on the hosts: a command name or path
        (``~/`` is the home directory), or an argv list such as
        ``["prlimit", "--nofile=1024:", "python3"]``; a string with spaces or
        other characters a shell would interpret is refused. It must be the
        driver's major.minor version, with numpy and cloudpickle.
    machines_per_host: how many machines each host runs at once; machines
        are placed round-robin, on the host running the fewest.
    cache_dir: where hosts keep bundles, environments and run dirs (default
        ~/.cache/bigmachine): private (0700), checked before use (see
        remote/cache.py); a cache that others could write is refused.
    cache_keep, cache_max_age: after each start a host keeps the cache_keep
        most recently used bundles (and as many environments) that were used
        within cache_max_age seconds, and removes the others, except those a
        running machine holds.
    user_paths: the directories of user code to ship; None means the driver's
        cwd and its sys.path entries outside any installation.
    include, exclude: glob patterns (matched on file/dir names and on paths
        relative to each user path) of the user files to ship.
    build: "auto" ships the driver's compiled extensions when the host's
        platform tag matches (building them there with Cython if they do not
        load); "always" builds them on the host.
    bind: the address machines listen on (default: the address the host was
        reached at, from sshd's SSH_CONNECTION).
    connect_timeout: seconds for TCP connect, SSH banner and authentication.
    tls: (default True) every connection of the cluster is TLS 1.3 with
        certificates of the per-cluster CA; each machine's key and certificate
        travel over its SSH channel's stdin, like the cluster secret.
    tunnel: reach the machines through the SSH connection (paramiko
        direct-tcpip) instead of directly, for hosts whose ports the driver
        cannot reach: machines then listen on the host's 127.0.0.1 (unless
        bind says otherwise) and each gets a forwarding listener on the
        driver's 127.0.0.1, which becomes its address. The price: bulk data
        goes through paramiko's pure-Python SSH, and machines cannot call each
        other by handle (a handle carries the driver's forwarding address).

    packages: requirement strings or paths of local wheels (as pip takes
        them), or "driver": what the user's code imports, at the driver's
        versions. requirements: a requirements file. pip_options: more
        options of pip download, such as ["--index-url", URL] or
        ["--find-links", DIR]. The driver downloads wheels for each host's
        platform and Python, ships them (with its own pip) as bundles, and
        each host installs them into a cached venv that also reaches the
        host's own packages; machines run in it. A package without a wheel
        for a host fails the start before any machine launches.

    uploads lists (host, bundle label, hash, bytes) for every bundle sent;
    envs lists (host, env python, seconds, why it was rebuilt or None) for
    every environment a start used.
    Defaults suit networks: lost_after 15 s, lease 30 s, and socket buffers
    left to the kernel's autotuning (socket_buffer=0).
    """

    name = "ssh"
    lost_after = 15.0
    lease = 30.0
    socket_buffer = 0  # autotuned: real networks have a larger bandwidth-delay product
    start_timeout = 120.0

    def __init__(self, hosts: Iterable[str], user: Optional[str] = None, port: int = 22,
                 key_filename: Any = None, known_hosts: Optional[str] = None,
                 accept_new_hosts: bool = False, python: Union[str, Sequence[str]] = "python3",
                 machines_per_host: int = 1, tls: bool = True, tunnel: bool = False,
                 agent: bool = True, cache_dir: str = "~/.cache/bigmachine",
                 user_paths: Optional[Sequence[str]] = None,
                 include: Sequence[str] = ("*.py",), exclude: Sequence[str] = (),
                 build: str = "auto", bind: Optional[str] = None,
                 connect_timeout: float = 10.0, cache_keep: int = 16,
                 cache_max_age: float = 14 * 86400.0, packages: PackagesArg = None,
                 requirements: Optional[str] = None, pip_options: Optional[Sequence[str]] = None,
                 **options: Any):
        if isinstance(hosts, str):
            hosts = [hosts]
        specs = [parse_host(h, user, port) for h in hosts]
        if not specs:
            raise Error("SSH needs at least one host")
        if not isinstance(machines_per_host, int) or machines_per_host < 1:
            raise Error(f"machines_per_host must be a positive int, not {machines_per_host!r}")
        if build not in ("auto", "always"):
            raise Error(f"build must be 'auto' or 'always', not {build!r}")
        if not isinstance(cache_keep, int) or cache_keep < 1:
            raise Error(f"cache_keep must be a positive int, not {cache_keep!r}")
        if not isinstance(cache_max_age, (int, float)) or cache_max_age <= 0:
            raise Error(f"cache_max_age must be a positive number of seconds, not "
                        f"{cache_max_age!r}")
        self.user = user
        self.port = port
        self.key_filename = key_filename
        files = [key_filename] if isinstance(key_filename, (str, os.PathLike)) else key_filename
        self.key_files = [os.path.expanduser(os.fspath(f)) for f in files or ()]
        self.known_hosts_path = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self.accept_new_hosts = accept_new_hosts
        self.python = python
        self.python_argv = python_argv(python)
        self.machines_per_host = machines_per_host
        self.tunnel = bool(tunnel)
        self.agent = agent
        if not isinstance(cache_dir, str) or os.pathsep in cache_dir:
            raise Error(f"cache_dir must be a path without {os.pathsep!r} (it goes on the "
                        f"machines' PYTHONPATH), not {cache_dir!r}")
        self.cache_dir = cache_dir
        self.user_paths = None if user_paths is None else [os.path.abspath(p) for p in user_paths]
        self.include = tuple(include)
        self.exclude = tuple(DEFAULT_EXCLUDE) + tuple(exclude)
        self.build = build
        self.bind = bind
        self.connect_timeout = float(connect_timeout)
        self.cache_keep = cache_keep
        self.cache_max_age = float(cache_max_age)
        self.packages = Packages(packages, requirements, pip_options)
        self.uploads: list[tuple[str, str, str, int]] = []
        self.envs: list[tuple[str, str, float, Optional[str]]] = []
        self._lock = threading.Lock()  # over placement: each host's reserved and procs
        self._hosts = [Host(self, h, u, p, self._lock) for h, u, p in specs]
        self._binds: dict[str, str] = {}  # host label -> the address its machines listen on
        self.configure(tls=tls, **options)

    def __repr__(self) -> str:
        return f"SSH(hosts={[h.label for h in self._hosts]!r})"

    # ---- launching

    def launch(self, creds: Credentials, names: list[str], timeout: float,
               env: Optional[dict] = None) -> list[Any]:
        """Start the machines; one whose host cannot be prepared or which fails to
        come up is an exception in the list (see System.launch), unless all fail."""
        deadline = time.monotonic() + timeout
        assignments = exports(env or {})
        placement = self._place(names)
        results: list[Any] = [None] * len(names)
        procs: dict[int, SSHProcess] = {}
        unreserved = set(range(len(names)))  # placements whose host slot is still reserved
        try:
            hosts = list(dict.fromkeys(placement))
            user = self._user_bundles()
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
                futures = {h: pool.submit(self._prepare, h, user, deadline) for h in hosts}
                plans = {h: f.exception() or f.result() for h, f in futures.items()}
            launch_id = uuid.uuid4().hex[:12]
            for i, (name, host) in enumerate(zip(names, placement)):
                plan = plans[host]
                try:
                    if isinstance(plan, BaseException):
                        raise plan
                    procs[i] = self._spawn(host, plan, creds, name, launch_id, deadline,
                                           assignments)
                    unreserved.discard(i)  # _spawn moved it to the host's machines
                except Exception as exc:
                    results[i] = exc
            for i, proc in procs.items():
                try:
                    proc.addr = proc.await_addr(deadline, timeout)
                    if self.tunnel:
                        proc.forward()
                    results[i] = proc
                except Exception as exc:
                    proc.stop(0.0, grace=0.5)
                    results[i] = exc
        except BaseException:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
                list(pool.map(lambda p: p.stop(0.0, grace=0.5), procs.values()))
            raise
        finally:
            with self._lock:
                for i in unreserved:
                    placement[i].reserved -= 1
        if all(isinstance(r, BaseException) for r in results):
            raise results[0]
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                log.warning("%s did not start on %s: %s", names[i], placement[i].label, r)
        return results

    def _place(self, names: list[str]) -> list[Host]:
        """Round-robin: each machine goes to the host running the fewest."""
        with self._lock:
            free = sum(self.machines_per_host - h.load() for h in self._hosts)
            if len(names) > free:
                raise Error(
                    f"cannot start {len(names)} machines: {len(self._hosts)} hosts x "
                    f"machines_per_host={self.machines_per_host} leaves room for {free} more")
            placement = []
            for _ in names:
                host = min(self._hosts, key=lambda h: h.load())  # the first of ties
                host.reserved += 1
                placement.append(host)
            return placement

    def _user_bundles(self) -> list[Bundle]:
        paths = self.user_paths if self.user_paths is not None else user_paths()
        return [user_bundle(p, self.include, self.exclude) for p in paths]

    def _prepare(self, host: Host, user: list[Bundle], deadline: float) -> Plan:
        """Connect, probe, and ship what the host lacks; return the launch plan."""
        host.client(deadline)
        plan = prepare(host.label, host.run_argv, self.python_argv, self.cache_dir, user,
                       self.packages, self.build, self.cache_keep, self.cache_max_age,
                       deadline, "SSH(python=...)")
        with self._lock:
            for bundle, size in plan.sent:
                self.uploads.append((host.label, bundle.label, bundle.hash, size))
            if plan.env is not None:
                self.envs.append((host.label, plan.env["python"], plan.env["seconds"],
                                  plan.env["rebuilt"]))
        self._binds[host.label] = bind_address(host.label, plan.probe, self.bind, self.tunnel)
        return plan

    def _spawn(self, host: Host, plan: Plan, creds: Credentials, name: str,
               launch_id: str, deadline: float, assignments: str = "") -> SSHProcess:
        client = host.machine_client(deadline)
        try:
            run_dir = machine_dir(plan, launch_id, name)
            tmp = join([run_dir + "/tmp"])
            command = (
                f"(umask 077 && mkdir -p {tmp}) && cd {join([run_dir])} && "
                f"echo {PID_PREFIX}$$ && "
                f"TMPDIR={tmp} PYTHONPATH={join([plan.bigmachine])} "
                f"PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 {assignments}"
                f"exec {join(plan.argv(self.python_argv))}")
            chan = open_session(client, host.label, deadline)
        except BaseException:
            host.release_session(client)
            raise
        bind = self._binds[host.label]
        config = plan.config(run_dir, f"[{bind}]:0" if ":" in bind else f"{bind}:0", self)
        data = bootstrap(creds, name, config, (bind,))
        chan.settimeout(None)
        try:
            exec_command(chan, command, host.label, deadline)
        except BaseException:
            host.release_session(client)
            raise
        proc = SSHProcess(host, client, name, run_dir, chan)
        proc.cert_hosts = (bind,)
        try:
            chan.sendall(data)
        except BaseException:
            proc.stop(0.0, grace=0.5)
            raise
        with self._lock:
            host.reserved -= 1
            host.procs.append(proc)
        return proc

    def shutdown(self) -> None:
        for host in self._hosts:
            host.close()
