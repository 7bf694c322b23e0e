"""bm.EC2 against a real moto server, with every instance really booted.

The module's harness (tests/ec2harness.py) runs moto on loopback, makes the
VPC in a range this host does not route (an `unreachable` route for all of
it before anything launches), and boots each instance's user-data in its own
network, mount and PID namespaces. Systems use address="private" only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bigmachine as bm
from bigmachine.backends.ec2.instances import TAG_CLUSTER
from tests.conftest import poll
from tests.ec2harness import ENV, REGION, FaultProxy, Harness, decode
from tests.ssh_services import Remote

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
TIMING = dict(keepalive_period=0.5, lost_after=3.0, lease=5.0)


@pytest.fixture(scope="module")
def lab():
    harness = Harness()
    errors = []
    try:
        harness.start()
        yield harness
    finally:
        errors = harness.stop()
    assert not errors, f"the harness failed: {errors}"


@pytest.fixture
def system(lab):
    def make(**kwargs):
        options = dict(ami=lab.ami, subnet=lab.subnet, address="private", region="us-east-1",
                       endpoint_url=lab.url, python=sys.executable, user_paths=[str(ROOT)],
                       boot_timeout=30, instance_type="m7i.large", **TIMING)
        options.update(kwargs)
        return bm.EC2(**options)

    return make


def cluster_of(b) -> str:
    return b.node.creds.cluster_id.hex()


def live(lab, cluster: str) -> list[dict]:
    """The cluster's instances that are not shutting down or terminated."""
    return [d for d in lab.instances(("pending", "running", "stopping", "stopped"))
            if {t["Key"]: t["Value"] for t in d.get("Tags", ())}.get(TAG_CLUSTER) == cluster]


def test_calls_arrays_machine_to_machine_and_shutdown(lab, system):
    ec2 = system(machines_per_instance=2)
    started = time.monotonic()
    b = bm.start(ec2)
    try:
        machines = b.start(3, {"Remote": Remote()})
        boot = time.monotonic() - started
        print(f"3 machines on 2 instances RUNNING {boot:.1f} s after bm.start")
        cluster = cluster_of(b)
        instances = live(lab, cluster)
        assert len(instances) == 2
        tags = {t["Key"]: t["Value"] for t in instances[0]["Tags"]}
        assert tags["bigmachine"] == "true" and tags["Name"].startswith("bigmachine ")
        m0, m1, m2 = machines
        assert [m.addr.split(":")[0] for m in machines] == \
            [instances[0]["PrivateIpAddress"]] * 2 + [instances[1]["PrivateIpAddress"]]
        assert m0.call("Remote.where")["pid"] != m1.call("Remote.where")["pid"]
        data = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
        assert m2.call("Remote.total", data) == float(data.sum())
        assert m0.call("Remote.relay", m2, "across") == "across"  # instance to instance
        assert m0.call("Remote.relay", m1, "within") == "within"
        # Nothing secret went into the user-data.
        data_seen = [lab.boxes[d["InstanceId"]] for d in instances]
        for box in data_seen:
            text = (box.dir / "user-data").read_bytes()
            assert len(text) <= 16384 and text.startswith(b"#!")
            assert b.node.creds.secret not in text and b.node.creds.secret.hex().encode() not in text
            assert b.node.creds.ca.ca_pem.split(b"\n")[1] not in text
        group = ec2.group
        assert group is not None
        # The instance type's facts (describe_instance_types) appear in status;
        # the machine measures its own cpus as everywhere.
        status = b.status()
        host = status[0].host
        assert host["instance"] == instances[0]["InstanceId"] and host["vcpus"] >= 1
        assert host["type"] == instances[0]["InstanceType"] and host["memory"] > 0
        assert status[0].cpus >= 1 and host["instance"] in str(status)
    finally:
        b.shutdown()
    assert not live(lab, cluster)
    states = {d["State"]["Name"] for d in lab.instances(("shutting-down", "terminated"))
              if d["InstanceId"] in {i["InstanceId"] for i in instances}}
    assert states <= {"shutting-down", "terminated"} and states
    with pytest.raises(Exception, match="InvalidGroup.NotFound"):
        lab.ec2().describe_security_groups(GroupIds=[group])
    poll(lambda: all(lab.boxes[i["InstanceId"]].killed for i in instances), timeout=10)


def test_instance_terminated_under_its_machine_is_lost_with_ec2s_reason(lab, system):
    ec2 = system()
    with bm.start(ec2) as b:
        m, = b.start(1, {"Remote": Remote()})
        instance = live(lab, cluster_of(b))[0]["InstanceId"]
        looks = ec2.monitor.looks
        lab.ec2().terminate_instances(InstanceIds=[instance])  # "in the console"
        gone = time.monotonic()
        m.wait(bm.State.STOPPED, timeout=15)
        took = time.monotonic() - gone
        assert isinstance(m.err, bm.MachineLost)
        assert "Client.UserInitiatedShutdown" in str(m.err), m.err
        assert took < 10, took
        assert ec2.monitor.looks - looks <= 2  # batched: not one look per attempt


def driver_options(lab, **extra) -> dict:
    return dict(ami=lab.ami, subnet=lab.subnet, address="private", region="us-east-1",
                endpoint_url=lab.url, python=sys.executable, user_paths=[str(ROOT)],
                boot_timeout=30, **TIMING, **extra)


def spawn_driver(lab, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.ec2_driver",
                             json.dumps(driver_options(lab, **extra))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **ENV))


def test_driver_sigkill_ends_its_instance_by_lease_and_poweroff(lab):
    driver = spawn_driver(lab)
    try:
        cluster = driver.stdout.readline().split()[1]
        assert driver.stdout.readline().strip() == "running", driver.stderr.read()
        instance = live(lab, cluster)[0]["InstanceId"]
        driver.kill()
        driver.wait(10)
        killed = time.monotonic()
        poll(lambda: not live(lab, cluster), timeout=TIMING["lease"] + 15)
        assert lab.boxes[instance].powered_off()  # the agent powered it off: nobody else
        print(f"instance ended {time.monotonic() - killed:.1f} s after its driver's SIGKILL "
              f"(lease {TIMING['lease']} s)")
    finally:
        driver.kill()
        driver.wait(10)
        driver.stdout.close()
        driver.stderr.close()


def test_ctrl_c_during_start_terminates_what_was_launched(lab):
    lab.hold = True  # instances stay unbooted: the driver waits for their agents
    driver = spawn_driver(lab)
    try:
        cluster = driver.stdout.readline().split()[1]
        poll(lambda: live(lab, cluster), timeout=15)
        time.sleep(0.5)  # dialling
        driver.send_signal(signal.SIGINT)
        assert driver.wait(15) != 0
        assert "KeyboardInterrupt" in driver.stderr.read()
        assert not live(lab, cluster)
    finally:
        lab.hold = False
        driver.kill()
        driver.wait(10)
        driver.stdout.close()
        driver.stderr.close()


def test_spot_falls_back_to_on_demand(lab, system):
    proxy = FaultProxy(lab.url, lambda p: "InsufficientInstanceCapacity"
                       if "InstanceMarketOptions.MarketType" in p else None)
    try:
        ec2 = system(spot=True, endpoint_url=proxy.url)
        with bm.start(ec2) as b:
            m, = b.start(1, {"Remote": Remote()})
            assert m.call("Remote.echo", 1) == 1
            instance, = live(lab, cluster_of(b))
            assert instance.get("InstanceLifecycle", "on-demand") != "spot"
        assert proxy.failed == ["InsufficientInstanceCapacity"]
        ec2 = system(spot="only", endpoint_url=proxy.url)
        with bm.start(ec2) as b:
            with pytest.raises(bm.Error, match="spot='only'"):
                b.start(1, {"Remote": Remote()})
            assert not live(lab, cluster_of(b))
    finally:
        proxy.close()


def test_spot_when_there_is_capacity(lab, system):
    with bm.start(system(spot=True)) as b:
        m, = b.start(1, {"Remote": Remote()})
        assert m.call("Remote.echo", 2) == 2
        assert live(lab, cluster_of(b))[0].get("InstanceLifecycle") == "spot"


ERRORS = {
    "unknown type": (dict(instance_type="m99.huge"), "InvalidInstanceType.*instance_type"),
    "bad AMI": (dict(ami="ami-12345678"), "InvalidAMIID.*ami="),
    "bad subnet": (dict(subnet="subnet-12345678"), "InvalidSubnetID.*subnet="),
    "quota": ("InstanceLimitExceeded", "quota.*fewer machines"),
    "capacity": ("InsufficientInstanceCapacity", "no capacity.*another instance_type"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_fail_fast_say_what_to_fix_and_leave_nothing(lab, system, case):
    change, message = ERRORS[case]
    proxy = None
    if isinstance(change, str):
        proxy = FaultProxy(lab.url, lambda p, code=change: code)
        change = dict(endpoint_url=proxy.url)
    try:
        with bm.start(system(**change)) as b:
            started = time.monotonic()
            with pytest.raises(bm.Error, match=message):
                b.start(2, {"Remote": Remote()})
            assert time.monotonic() - started < 10
            assert not live(lab, cluster_of(b))
    finally:
        if proxy is not None:
            proxy.close()


def refused_launch(lab, system, **change):
    """b.start with every RunInstances refused by a proxy (nothing boots): the system,
    the RunInstances requests it made, and the error b.start raised."""
    asked: list[dict] = []
    proxy = FaultProxy(lab.url, lambda p: asked.append(p) or "InsufficientInstanceCapacity")
    try:
        ec2 = system(endpoint_url=proxy.url, **change)
        with bm.start(ec2) as b:
            started = time.monotonic()
            with pytest.raises(bm.Error) as raised:
                b.start(1, {"Remote": Remote()})
            assert time.monotonic() - started < 10
            assert not live(lab, cluster_of(b))
    finally:
        proxy.close()
    return ec2, asked, raised.value


def setup_and_agent(request: dict) -> tuple[str, str]:
    """The setup part of a RunInstances request's user-data, and the agent's command line."""
    text = decode(request["UserData"]).decode()
    setup = text.split("<<'BIGMACHINE_SETUP'\n")[1].split("\nBIGMACHINE_SETUP\n")[0]
    agent, = [line for line in text.splitlines() if line.startswith("setsid ")]
    return setup, agent


@pytest.mark.parametrize("instance_type, arch", [("m7i.large", "x86_64"),
                                                 ("m7g.large", "arm64")])
def test_default_ami_is_the_latest_al2023_with_the_drivers_python(lab, system, caplog,
                                                                   instance_type, arch):
    """ami=None: SSM's public parameter for the type's architecture picks the image,
    and setup installs the driver's Python, numpy and cloudpickle before the user's."""
    import boto3
    import cloudpickle

    caplog.set_level(logging.INFO, logger="bigmachine.ec2")
    ssm = boto3.client("ssm", endpoint_url=lab.url, region_name=REGION)
    want = ssm.get_parameter(Name="/aws/service/ami-amazon-linux-latest/"
                                  f"al2023-ami-kernel-default-{arch}")["Parameter"]["Value"]
    image, = lab.ec2().describe_images(ImageIds=[want])["Images"]
    assert image["Architecture"] == arch and image["Name"].startswith("al2023-ami-")
    ec2, asked, err = refused_launch(lab, system, ami=None, python="python3",
                                     instance_type=instance_type, setup="echo theirs")
    assert "InsufficientInstanceCapacity" in str(err)
    assert asked and {r["ImageId"] for r in asked} == {want}
    assert f"using {want}, the latest Amazon Linux 2023 for {arch}" in caplog.text
    version = "%d.%d" % sys.version_info[:2]
    pins = f"numpy=={np.__version__} cloudpickle=={cloudpickle.__version__}"
    setup, agent = setup_and_agent(asked[0])
    assert setup == (
        f"# bigmachine (ami=None): the driver's Python {version}, numpy, cloudpickle\n"
        f"dnf install -y python{version} python{version}-pip || exit\n"
        f"python{version} -m pip install --no-cache-dir {pins} || exit\n"
        "echo theirs")
    assert agent.startswith("setsid /usr/bin/python3 ")  # the image's own, before setup
    assert ec2.python == f"python{version}"  # what the machines run


def test_default_ami_without_the_drivers_python_fails_before_launching(lab, system,
                                                                      monkeypatch):
    from bigmachine.backends.ec2 import image

    monkeypatch.setattr(image, "DRIVER", (3, 10))
    _, asked, err = refused_launch(lab, system, ami=None, python="python3")
    assert asked == []  # no run_instances at all
    assert re.search(r"no Python 3\.10.*pass ami=.*python=", str(err)), err


def test_explicit_ami_and_python_take_precedence(lab, system, caplog):
    caplog.set_level(logging.INFO, logger="bigmachine.ec2")
    ec2, asked, _ = refused_launch(lab, system, python="python3")  # ami=lab.ami
    assert {r["ImageId"] for r in asked} == {lab.ami}
    setup, agent = setup_and_agent(asked[0])
    assert setup == "" and agent.startswith("setsid python3 ")
    assert ec2.python == "python3" and "Amazon Linux 2023" not in caplog.text
    # ami=None with python= of the user's: their Python and setup, untouched.
    ec2, asked, _ = refused_launch(lab, system, ami=None, python="/opt/py/bin/python3",
                                   setup="echo theirs")
    assert setup_and_agent(asked[0])[0] == "echo theirs"
    assert ec2.python == "/opt/py/bin/python3"


def test_missing_credentials(lab, system, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    with bm.start(system()) as b:
        started = time.monotonic()
        with pytest.raises(bm.Error, match="no AWS credentials.*AWS_ACCESS_KEY_ID"):
            b.start(1, {"Remote": Remote()})
        assert time.monotonic() - started < 10


def test_max_instances(lab, system):
    with bm.start(system(max_instances=1)) as b:
        with pytest.raises(bm.Error, match="max_instances=1"):
            b.start(2, {"Remote": Remote()})
        assert not live(lab, cluster_of(b))


def test_replayed_user_data_never_makes_a_member(lab, system):
    with bm.start(system()) as b:
        m, = b.start(1, {"Remote": Remote()})
        instance = live(lab, cluster_of(b))[0]
        port = int(m.addr.split(":")[1]) - 1
        # The first agent took its driver and listens no more: the material is spent.
        with pytest.raises(ConnectionRefusedError):
            socket_to(instance["PrivateIpAddress"], port)
        replay = lab.replay(instance["InstanceId"], f"{lab.prefix}.1.250")
        poll(lambda: "listening" in replay.agent_log(), timeout=10)
        # Whoever holds the user-data can reach the replayed agent, not the cluster:
        # no token passes (only its hash is there) and nothing there is a member.
        from bigmachine.backends.ec2.link import AgentLink
        from bigmachine.backends.ec2.userdata import OneTime
        import threading

        text = (replay.dir / "user-data").read_text()
        config = json.loads(text.split("<<'BIGMACHINE_CONFIG' &\n")[1].splitlines()[0])
        forged = OneTime(config["cert"].encode(), config["key"].encode(), os.urandom(32))
        with pytest.raises((bm.Error, bm.AuthError)):
            AgentLink.open("replay", replay.ip, port, forged, time.monotonic() + 5, 5,
                           threading.Event())
        with pytest.raises(bm.Error):
            b.dial(f"{replay.ip}:{port + 1}").call("Remote.echo", 1, timeout=5)
        assert [x.name for x in b.machines() if x.owned] == [m.name]
        assert m.call("Remote.echo", 3) == 3
        replay.kill()


def socket_to(ip: str, port: int) -> None:
    import socket

    socket.create_connection((ip, port), timeout=5).close()


def test_user_data_golden():
    from bigmachine.backends.ec2.userdata import OneTime, user_data

    one = OneTime.generate(600)
    text = user_data(one, ["python3"], "apt-get install -y python3-numpy", 7950, 600)
    assert text.startswith("#!/bin/sh\n") and len(text.encode()) <= 16384
    masked = text.replace(json.dumps(one.cert_pem.decode())[1:-1], "<ONE-TIME CERT>")
    masked = masked.replace(json.dumps(one.key_pem.decode())[1:-1], "<ONE-TIME KEY>")
    masked = re.sub(r'"token_sha256": "[0-9a-f]{64}"', '"token_sha256": "<HASH>"', masked)
    golden = Path(__file__).with_name("golden") / "ec2_user_data.sh"
    if os.environ.get("BIGMACHINE_REGOLD"):
        golden.write_text(masked)
    assert masked == golden.read_text()
    assert one.token.hex() not in text and "PRIVATE KEY" in text  # only the one-time key


def test_cleanup_cli(lab, system):
    cli = [sys.executable, "-m", "bigmachine", "ec2"]
    where = ["--endpoint-url", lab.url, "--region", "us-east-1"]
    env = dict(os.environ, **ENV)
    b = bm.start(system())
    try:
        b.start(1, {"Remote": Remote()})
        cluster = cluster_of(b)
        instance = live(lab, cluster)[0]["InstanceId"]
        listed = subprocess.run(cli + ["list"] + where, capture_output=True, text=True,
                                env=env, timeout=60)
        assert instance in listed.stdout and cluster[:16] in listed.stdout, listed
        young = subprocess.run(cli + ["cleanup", "--cluster", cluster, "--older-than", "1h"]
                               + where, capture_output=True, text=True, env=env, timeout=60)
        assert "no bigmachine instances to terminate" in young.stdout
        assert live(lab, cluster)
        done = subprocess.run(cli + ["cleanup", "--cluster", cluster] + where,
                              capture_output=True, text=True, env=env, timeout=60)
        assert "terminating 1 instance(s)" in done.stdout and instance in done.stdout, done
        assert not live(lab, cluster)
    finally:
        b.shutdown()


def test_boto3_is_imported_only_when_ec2_is_used():
    code = ("import sys, bigmachine as bm; bm.EC2(ami='ami-1'); "
            "import bigmachine._worker; print('boto3' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_packages_are_shipped_to_instances(lab, system, tmp_path):
    """Issue 17 through the boot harness: a wheel the instance lacks, installed into
    its cached venv, which the machine runs in."""
    from tests.package_services import Packaged
    from tests.wheels import make_wheel

    wheel = make_wheel(tmp_path, "bmtiny", "1.0", "VERSION = '1.0'\n")
    ec2 = system(packages=[str(wheel)], pip_options=["--no-index"])
    with bm.start(ec2) as b:
        m, = b.start(1, {"Packaged": Packaged()})
        seen = m.call("Packaged.where")
    assert seen["version"] == "1.0" and seen["bmtiny"].startswith("/var/cache/bigmachine/envs/")
    assert [label for _, label, _, _ in ec2.uploads][-2:] == ["packages", "pip"]


def test_ec2_links_are_always_tls():
    system = bm.EC2(ami="ami-12345678", region="us-east-1")
    for options in ({"tls": False}, {"tls": False, "insecure": True}):
        with pytest.raises(bm.Error, match="always reached over TLS"):
            bm.start(system, **options)


def test_min_machines_keeps_the_instances_that_booted(lab, system):
    """One of two instances never boots: with min_machines=1 its machine is STOPPED with
    the cause, the instance is terminated, and the other machine runs."""
    lab.unbootable = 1
    b = bm.start(system(boot_timeout=6))
    try:
        t0 = time.monotonic()
        machines = b.start(2, {"Remote": Remote()}, min_machines=1)
        assert len(machines) == 1 and machines[0].call("Remote.echo", "up") == "up"
        assert time.monotonic() - t0 < 20
        assert b.machines() == machines
        stopped = [r for r in b.status() if r.state == "STOPPED"]
        assert len(stopped) == 1 and stopped[0].err, stopped  # with its cause
        skipped, = lab.skipped
        poll(lambda: skipped not in {d["InstanceId"] for d in live(lab, cluster_of(b))},
             timeout=10)
    finally:
        b.shutdown()
    assert not live(lab, cluster_of(b))


def test_one_system_serves_one_session_after_another(lab, system):
    ec2 = system(max_instances=1)
    for i in range(2):
        with bm.start(ec2) as b:
            m, = b.start(1, {"Remote": Remote()})
            assert m.call("Remote.echo", i) == i  # max_instances counts per session
            cluster = cluster_of(b)
        assert not live(lab, cluster) and ec2.group is None
