"""The EC2 system: launches instances, boots machines on them through their agents."""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
import uuid
from typing import Any, Optional, Sequence, Union

from ..._auth import Credentials
from ...errors import Error
from .. import System
from .._bootstrap import bootstrap
from .._bundle import DEFAULT_EXCLUDE, Bundle, user_bundle, user_paths
from .._hostprep import Plan, prepare, run_dir
from .._packages import Packages, PackagesArg
from .._shell import exports, python_argv
from .aws import AWS
from .image import AGENT_PYTHON, python_setup
from .instances import Instance, describe, find, tag_specifications, terminate
from .launch import Facts, preflight, run_instances
from .link import AgentLink
from .monitor import Monitor
from .network import admit, delete_group, dial_address, driver_source, make_group
from .process import Booted, EC2Process
from .userdata import OneTime, user_data

log = logging.getLogger("bigmachine.ec2")

AGENT_PORT = 7950  # the agent's; machines listen on the ports after it, one per slot
CACHE_DIR = "/var/cache/bigmachine"
SHUTDOWN_WAIT = 120.0  # seconds shutdown waits for EC2 to report the instances going


class EC2(System):
    """Machines on EC2 instances (boto3), started through a bootstrap agent.

    instance_type: the EC2 type; its vCPUs and memory are looked up.
    ami: the image: a Linux with a POSIX shell and the driver's Python
        major.minor (python=) with numpy and cloudpickle (or setup= that
        installs them). None: the latest Amazon Linux 2023 of the type's
        architecture (AWS Systems Manager's public parameter; logged); unless
        python= says otherwise, setup then first installs the driver's Python
        (dnf) with its numpy and cloudpickle (pip), and python= is that
        Python: the instances need to reach package repositories (internet
        or a NAT gateway). An AMI of your own avoids it. b.start fails before
        launching when AL2023 has no package of the driver's Python.
    region: the AWS region (default: boto3's chain, e.g. AWS_DEFAULT_REGION).
    spot: True asks for spot instances and launches the shortfall on demand;
        "only" never launches on demand.
    subnet: the subnet id (default: the default VPC's default subnet).
    security_groups: group ids; they must admit the driver on ports
        port..port+machines_per_instance and the machines on each other's
        (port+1 on). None makes a group per cluster, deleted at shutdown.
    instance_profile: an IAM instance profile name or ARN for the instances.
    disk_gib: the root volume's size.
    tags: more tags for the instances and their volumes.
    address: "private", "public" or "auto" (public when the instance has one):
        the IP address literal the driver dials.
    python: the command that runs Python on the instances (as for SSH); with
        ami=None, left at "python3": the driver's, installed by setup.
    setup: shell run as root on each instance before its machines start
        (installing packages, mounting disks); its failure fails the start.
        With ami=None and python left at "python3", it runs after the install.
    machines_per_instance: machines each instance runs.
    boot_timeout: seconds an instance has to boot, run setup and accept the
        driver; its agent accepts nothing after it, and powers the instance
        off then unless machines run.
    endpoint_url: an AWS-compatible endpoint (moto, LocalStack) for every client.
    max_instances: instances a session may launch, in all.
    port: the agent's port; machines listen on the next ones.
    packages, requirements, pip_options: as for SSH (wheels shipped and
        installed into a cached venv on each instance).
    user_paths, include, exclude: the user code shipped, as for SSH.

    uploads and envs record what was shipped and built, as for SSH.
    Defaults suit networks: lost_after 15 s, lease 30 s, kernel-tuned socket buffers.
    """

    name = "ec2"
    lost_after = 15.0
    lease = 30.0
    socket_buffer = 0

    def __init__(self, instance_type: str = "m7i.large", ami: Optional[str] = None,
                 region: Optional[str] = None, spot: Union[bool, str] = False,
                 subnet: Optional[str] = None, security_groups: Optional[Sequence[str]] = None,
                 instance_profile: Optional[str] = None, disk_gib: int = 100,
                 tags: Optional[dict] = None, address: str = "auto",
                 python: Union[str, Sequence[str]] = "python3", setup: Optional[str] = None,
                 machines_per_instance: int = 1, boot_timeout: float = 600,
                 endpoint_url: Optional[str] = None, max_instances: int = 100,
                 port: int = AGENT_PORT, packages: PackagesArg = None,
                 requirements: Optional[str] = None, pip_options: Optional[Sequence[str]] = None,
                 user_paths: Optional[Sequence[str]] = None, include: Sequence[str] = ("*.py",),
                 exclude: Sequence[str] = (), **options: Any):
        if spot not in (True, False, "only"):
            raise Error(f"spot must be True, False or 'only', not {spot!r}")
        if address not in ("private", "public", "auto"):
            raise Error(f"address must be 'private', 'public' or 'auto', not {address!r}")
        for key, value in (("machines_per_instance", machines_per_instance),
                           ("disk_gib", disk_gib), ("max_instances", max_instances)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Error(f"{key} must be a positive int, not {value!r}")
        if not isinstance(boot_timeout, (int, float)) or boot_timeout <= 0:
            raise Error(f"boot_timeout must be a positive number of seconds, not "
                        f"{boot_timeout!r}")
        if not (isinstance(port, int) and 1024 <= port <= 65535 - machines_per_instance):
            raise Error(f"port must leave room for machines_per_instance ports after it "
                        f"(1024..{65535 - machines_per_instance}), not {port!r}")
        self.instance_type = instance_type
        self.ami = ami  # None: the latest AL2023, looked up at the first launch
        self.spot = spot
        self.subnet = subnet
        self.security_groups = list(security_groups or ())
        self.instance_profile = instance_profile
        self.disk_gib = disk_gib
        self.tags = dict(tags or {})
        self.address = address
        self.python = python
        self.python_argv = python_argv(python)
        self.agent_argv = AGENT_PYTHON if ami is None else self.python_argv
        self.setup = setup
        self.machines_per_instance = machines_per_instance
        self.boot_timeout = float(boot_timeout)
        self.max_instances = max_instances
        self.port = port
        self.packages = Packages(packages, requirements, pip_options)
        self.user_paths = None if user_paths is None else [os.path.abspath(p) for p in user_paths]
        self.include = tuple(include)
        self.exclude = tuple(DEFAULT_EXCLUDE) + tuple(exclude)
        self.start_timeout = self.boot_timeout + 120.0
        self.aws = AWS(region, endpoint_url)
        self.monitor = Monitor(lambda: self.aws.ec2, self._on_state)
        self.facts: Optional[Facts] = None
        self.group: Optional[str] = None  # the cluster's own security group, if made
        self.uploads: list[tuple[str, str, str, int]] = []
        self.envs: list[tuple[str, str, float, Optional[str]]] = []
        self._lock = threading.Lock()
        self._booted: dict[str, Booted] = {}  # by instance id: launched, not yet terminated
        self._count = 0  # instances launched by this session
        self._cluster = ""
        self._admit_lock = threading.Lock()
        self._admitted: set[str] = set()  # the driver's addresses our group admits
        self.configure(**{"tls": True, **options})  # check() refuses tls=False

    def init(self) -> None:
        """A new session: its own monitor, instance count and security group (a system
        object may serve one session after another)."""
        with self._lock:
            self.monitor = Monitor(lambda: self.aws.ec2, self._on_state)
            self._booted = {}
            self._count = 0
            self.group = None
        with self._admit_lock:
            self._admitted = set()

    def check(self) -> None:
        """EC2 links cross networks we do not control: always TLS (the contract's rule)."""
        if not self.tls:
            raise Error("EC2 machines are always reached over TLS: tls=False is not allowed, "
                        "even with insecure=True")
        super().check()

    def __repr__(self) -> str:
        return f"EC2(instance_type={self.instance_type!r}, ami={self.ami!r})"

    def instances(self) -> list[Instance]:
        """What EC2 last said of the instances this session launched."""
        with self._lock:
            return [b.instance for b in self._booted.values()]

    # ---- launching

    def launch(self, creds: Credentials, names: list[str], timeout: float,
               env: Optional[dict] = None) -> list[Any]:
        """Launch instances and start the machines on them; the machines of an instance
        that fails to boot are exceptions in the list (see System.launch)."""
        started = time.monotonic()
        deadline = started + timeout
        boot_deadline = min(deadline, started + self.boot_timeout)
        exports(env or {})  # names and values an environment can hold, or an Error
        mpi = self.machines_per_instance
        count = math.ceil(len(names) / mpi)
        with self._lock:
            if self._count + count > self.max_instances:
                raise Error(f"starting {len(names)} machines needs {count} more instances; "
                            f"this session launched {self._count} of max_instances="
                            f"{self.max_instances}: pass EC2(max_instances=...) to allow more")
            self._count += count
        self._cluster = creds.cluster_id.hex()
        try:
            facts = self._preflight()
            groups = self.security_groups or [self._group(facts)]
        except BaseException:
            with self._lock:
                self._count -= count
            raise
        one = OneTime.generate(self.boot_timeout)
        launch_id = uuid.uuid4().hex[:16]
        spec = self._spec(facts, groups, user_data(one, self.agent_argv, self.setup,
                                                   self.port, self.boot_timeout), launch_id)
        log.info("launching %d %s instance(s) (%d vCPUs, %d MiB each) for %d machine(s)",
                 count, facts.instance_type, facts.vcpus, facts.mem_bytes >> 20, len(names))
        launched: list[Instance] = []
        procs: list[EC2Process] = []
        cancel = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, count),
                                                     thread_name_prefix="bigmachine-ec2-boot")
        try:
            try:
                run_instances(self.aws.ec2, spec, count, self.spot, launch_id, launched)
            finally:
                with self._lock:
                    self._booted.update((i.id, Booted(i, facts)) for i in launched)
            user = self._user_bundles()
            jobs = []
            for k, instance in enumerate(launched):
                slots = names[k * mpi:(k + 1) * mpi]
                jobs.append((instance, slots, pool.submit(
                    self._boot, self._booted[instance.id], slots, one, creds, env or {},
                    launch_id, user, boot_deadline, deadline, cancel, procs)))
            failed: dict[str, BaseException] = {}  # by machine name
            for instance, slots, job in jobs:
                error = job.exception()
                if error is not None and not isinstance(error, Exception):
                    raise error
                failed.update((name, error) for name in slots if error is not None)
            if len(failed) == len(names):
                raise failed[names[0]]
        except BaseException:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                self._count -= count - len(launched)
            self._abandon(launched, launch_id, procs)
            raise
        pool.shutdown(wait=True)
        self._end_failed(jobs, failed, procs)
        log.info("%d machine(s) on %d instance(s) running %.1f s after launch",
                 len(names) - len(failed), count, time.monotonic() - started)
        by_name = {p.name: p for p in procs}
        return [failed.get(name) or by_name[name] for name in names]

    def _end_failed(self, jobs: list, failed: dict, procs: list[EC2Process]) -> None:
        """Instances whose machines did not all come up are ended, with those machines:
        the others of the launch are kept (b.start's min_machines decides)."""
        bad = [instance.id for instance, slots, _ in jobs if any(n in failed for n in slots)]
        for instance_id, slots in ((i.id, s) for i, s, _ in jobs if i.id in bad):
            for proc in [p for p in procs if p.name in slots]:
                proc.stop(0.0)
                procs.remove(proc)
                failed.setdefault(proc.name, Error(f"{proc.name}: another machine of its "
                                                   f"instance {instance_id} did not start"))
            log.warning("%s: its machines did not start (%s); terminating it", instance_id,
                        "; ".join(str(failed[n]) for n in slots if n in failed))
        if bad:
            self._terminate(bad, wait=30.0)

    def _preflight(self) -> Facts:
        if self.facts is None:
            if self.ami is None and self.python == "python3":  # AL2023's python3 is 3.9
                self.python, self.setup = python_setup(self.setup)
                self.python_argv = python_argv(self.python)
            self.facts = preflight(self.aws, self.instance_type, self.ami, self.subnet,
                                   self.security_groups)
            if self.machines_per_instance > self.facts.vcpus:
                log.warning("machines_per_instance=%d exceeds the %d vCPUs of %s",
                            self.machines_per_instance, self.facts.vcpus, self.instance_type)
        return self.facts

    def _group(self, facts: Facts) -> str:
        with self._lock:
            if self.group is None:
                self.group = make_group(self.aws.ec2, facts.vpc, self._cluster, self.port,
                                        self.port + self.machines_per_instance)
                log.info("made the security group %s", self.group)
            return self.group

    def _admit(self, booted: Booted, ip: str, deadline: float, cancel: threading.Event) -> None:
        """Open our own group to the driver as the instance at ip sees it."""
        if self.group is None:
            return
        cidr = driver_source(booted.instance, ip, deadline, cancel)
        with self._admit_lock:
            if cidr not in self._admitted:
                admit(self.aws.ec2, self.group, cidr, self.port,
                      self.port + self.machines_per_instance)
                self._admitted.add(cidr)
                log.info("the security group %s admits this driver at %s", self.group, cidr)

    def _spec(self, facts: Facts, groups: list[str], data: str, launch_id: str) -> dict:
        spec: dict = {
            "ImageId": facts.ami, "InstanceType": facts.instance_type, "UserData": data,
            "InstanceInitiatedShutdownBehavior": "terminate",
            "SecurityGroupIds": groups,
            "BlockDeviceMappings": [{"DeviceName": facts.root_device, "Ebs": {
                "VolumeSize": self.disk_gib, "DeleteOnTermination": True,
                "VolumeType": "gp3"}}],
            "TagSpecifications": tag_specifications(self._cluster, launch_id, self.tags),
        }
        if self.subnet:
            spec["SubnetId"] = self.subnet
        if self.instance_profile:
            key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
            spec["IamInstanceProfile"] = {key: self.instance_profile}
        return spec

    def _user_bundles(self) -> list[Bundle]:
        paths = self.user_paths if self.user_paths is not None else user_paths()
        return [user_bundle(p, self.include, self.exclude) for p in paths]

    def _boot(self, booted: Booted, names: list[str], one: OneTime, creds: Credentials,
              env: dict, launch_id: str, user: list[Bundle], boot_deadline: float,
              deadline: float, cancel: threading.Event, procs: list[EC2Process]) -> None:
        """Reach the instance's agent, prepare the instance, start its machines."""
        label = booted.id
        ip = self._await_address(booted, boot_deadline, cancel)
        self._admit(booted, ip, boot_deadline, cancel)
        link = AgentLink.open(f"{label} ({ip})", ip, self.port, one, boot_deadline,
                              self.boot_timeout, cancel)
        if cancel.is_set():
            link.close()
            return
        booted.link = link
        link.on_broken.append(lambda _: self.monitor.check(label))
        setup = link.setup
        if setup.get("status"):
            tail = "\n".join(f"  {line}" for line in setup.get("tail", "").splitlines()[-20:])
            raise Error(f"{label}: setup failed (exit status {setup['status']}); its last "
                        f"output:\n{tail}")
        plan = prepare(label, link.run, self.python_argv, CACHE_DIR, user, self.packages,
                       "auto", 8, 14 * 86400.0, deadline, "EC2(python=...)")
        with self._lock:
            for bundle, size in plan.sent:
                self.uploads.append((label, bundle.label, bundle.hash, size))
            if plan.env is not None:
                self.envs.append((label, plan.env["python"], plan.env["seconds"],
                                  plan.env["rebuilt"]))
        mine = []
        for slot, name in enumerate(names):
            if cancel.is_set():
                return
            mine.append(self._spawn(booted, plan, ip, self.port + 1 + slot, name, creds, env,
                                    launch_id, deadline))
            with self._lock:
                procs.append(mine[-1])
        for proc in mine:
            proc.await_addr(deadline, deadline - time.monotonic())

    def _await_address(self, booted: Booted, deadline: float, cancel: threading.Event) -> str:
        while True:
            ip = dial_address(booted.instance, self.address)
            if ip:
                return ip
            if booted.instance.gone or time.monotonic() > deadline:
                raise Error(f"instance {booted.id} has no {self.address} address "
                            f"({booted.instance.describe_state()}): pass address='private', "
                            "or a subnet that gives instances public addresses")
            if cancel.wait(1.0):
                raise Error("the launch was cancelled")
            found = describe(self.aws.ec2, [booted.id]).get(booted.id)
            if found is not None:
                booted.instance = found

    def _spawn(self, booted: Booted, plan: Plan, ip: str, port: int, name: str,
               creds: Credentials, env: dict, launch_id: str, deadline: float) -> EC2Process:
        here = run_dir(plan, launch_id, name)
        private = booted.instance.private_ip
        config = dict(plan.config(here, f"{private}:{port}", self), parent_pipe=False)
        data = bootstrap(creds, name, config, tuple(dict.fromkeys((ip, private))))
        machine_env = dict(env, PYTHONPATH=plan.bigmachine, TMPDIR=f"{here}/tmp",
                           PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        pipes = booted.link.start(name, plan.argv(self.python_argv), machine_env, here, data,
                                  deadline)
        proc = EC2Process(booted, name, pipes, f"{ip}:{port}", self.monitor.check,
                          self._stopped)
        proc.cert_hosts = tuple(dict.fromkeys((ip, private)))
        with booted.lock:
            booted.procs.append(proc)
        return proc

    def _abandon(self, launched: list[Instance], launch_id: str,
                 procs: list[EC2Process]) -> None:
        """A launch failed or was interrupted: end all it made, whatever happens next."""
        for proc in list(procs):
            proc.stop(0.0)
        ids = [i.id for i in launched]
        try:  # also what a call cut short made (it is tagged with the launch)
            ids += [i.id for i in find(self.aws.ec2, self._cluster, launch_id)]
        except Error as exc:
            log.warning("cannot look for instances of the failed launch: %s", exc)
        if ids:
            log.info("terminating %d instance(s) of the failed launch", len(set(ids)))
            self._terminate(ids, wait=30.0)

    # ---- the instances' ends

    def _on_state(self, instance: Instance) -> None:
        """The monitor's news of an instance."""
        with self._lock:
            booted = self._booted.get(instance.id)
        if booted is not None:
            booted.instance = instance
            if instance.gone and booted.procs:
                log.warning("%s under its machines", instance.describe_state())

    def _stopped(self, proc: EC2Process) -> None:
        """A machine stopped; when its instance has none left, end the instance."""
        booted = proc.booted
        with booted.lock:
            if proc in booted.procs:
                booted.procs.remove(proc)
            last = not booted.procs
        if last:
            if booted.link is not None:
                booted.link.close()  # its agent then powers the instance off, and:
            self._terminate([booted.id], wait=0.0)

    def _terminate(self, ids: list[str], wait: float) -> None:
        with self._lock:
            links = [self._booted[i].link for i in ids if i in self._booted]
        for link in links:
            if link is not None:
                link.close()
        try:
            terminate(self.aws.ec2, ids, wait)
        except Error as exc:
            log.error("cannot terminate instances %s: %s; `python -m bigmachine ec2 cleanup "
                      "--cluster %s` ends them", ", ".join(ids), exc, self._cluster)

    def shutdown(self) -> None:
        """Terminate every instance this session launched (waiting until EC2 reports them
        shutting down or gone), then delete the cluster's security group."""
        self.monitor.close()
        with self._lock:
            ids = list(self._booted)
        if ids:
            self._terminate(ids, wait=SHUTDOWN_WAIT)
        if self.group is not None and delete_group(self.aws.ec2, self.group, SHUTDOWN_WAIT):
            self.group = None
