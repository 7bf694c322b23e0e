"""bm.EC2 against a real moto server, with every instance really booted.

The module's harness (tests/ec2harness.py) runs moto on loopback, makes the
VPC in a range this host does not route (an `unreachable` route for all of
it before anything launches), and boots each instance's user-data in its own
network, mount and PID namespaces. Systems use address="private" only.
"""
from __future__ import annotations

import json
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
from tests.ec2harness import ENV, FaultProxy, Harness
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
    finally:
        b.shutdown()
    assert not live(lab, cluster)
    states = {d["State"]["Name"] for d in lab.instances(("shutting-down", "terminated"))
              if d["InstanceId"] in {i["InstanceId"] for i in instances}}
    assert states <= {"shutting-down", "terminated"} and states
    with pytest.raises(Exception, match="InvalidGroup.NotFound"):
        lab.ec2().describe_security_groups(GroupIds=[group])
    poll(lambda: all(lab.boxes[i["InstanceId"]].killed for i in instances), timeout=10)
