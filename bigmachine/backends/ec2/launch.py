"""Launching instances: checks that fail fast, then run_instances in batches.

Before anything is launched, the instance type, the AMI (the latest Amazon
Linux 2023 when none was given, see image), the subnet and the security
groups are looked up, so that a wrong one fails in seconds with what
to fix. Instances are launched with InstanceInitiatedShutdownBehavior
"terminate" (an instance that powers itself off is gone), tagged, with a root
volume of disk_gib. spot=True asks for spot instances first and launches the
shortfall on demand; spot="only" never launches on demand. Each call carries
a ClientToken, so botocore's retries never launch twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .aws import AWS, CAPACITY, AWSError, explain
from .image import latest
from .instances import Instance

log = logging.getLogger("bigmachine.ec2")
BATCH = 50  # instances per run_instances call
SPOT = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time",
                                              "InstanceInterruptionBehavior": "terminate"}}


@dataclass(frozen=True)
class Facts:
    """What the launch needs to know: the type's size, the AMI and its root device, the VPC."""

    instance_type: str
    ami: str
    vcpus: int
    mem_bytes: int
    root_device: str
    vpc: str
    subnet_cidr: str


def preflight(aws: AWS, instance_type: str, ami: Optional[str], subnet: Optional[str],
              groups: Sequence[str]) -> Facts:
    """Look up what the launch names (ami None: the latest AL2023 for the type); an
    AWSError that says what to fix if any is wrong."""
    ec2 = aws.ec2
    try:
        types = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except Exception as exc:
        raise explain(exc, f"look up instance_type={instance_type!r}") from exc
    if not types:
        raise AWSError("InvalidInstanceType", f"instance_type={instance_type!r} does not exist "
                       "in this region: choose one it offers (aws ec2 describe-instance-types)")
    kind = types[0]
    archs = kind.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    if ami is None:
        ami = latest(aws.client("ssm"), instance_type, archs)
    try:
        images = ec2.describe_images(ImageIds=[ami])["Images"]
    except Exception as exc:
        raise explain(exc, f"look up ami={ami!r}") from exc
    if not images:
        raise AWSError("InvalidAMIID.NotFound", f"ami={ami!r} was not found in this region: "
                       "AMIs are regional; pass an image id of this region")
    image = images[0]
    if archs and image.get("Architecture") and image["Architecture"] not in archs:
        raise AWSError("InvalidParameterValue", f"ami={ami!r} is for {image['Architecture']}, "
                       f"and {instance_type} runs {', '.join(archs)}: pass an AMI or an "
                       "instance_type of the other architecture")
    try:
        if subnet:
            found = ec2.describe_subnets(SubnetIds=[subnet])["Subnets"]
        else:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise AWSError("InvalidSubnetID", "this region has no default VPC: pass "
                               "subnet= a subnet id")
            found = ec2.describe_subnets(Filters=[
                {"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]},
                {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if groups:
            ec2.describe_security_groups(GroupIds=list(groups))
    except AWSError:
        raise
    except Exception as exc:
        raise explain(exc, "look up the subnet and security groups") from exc
    if not found:
        raise AWSError("InvalidSubnetID", f"subnet={subnet!r} was not found: pass a subnet id "
                       "of this region")
    return Facts(instance_type, ami, int(kind["VCpuInfo"]["DefaultVCpus"]),
                 int(kind["MemoryInfo"]["SizeInMiB"]) << 20,
                 image.get("RootDeviceName") or "/dev/xvda", found[0]["VpcId"],
                 found[0]["CidrBlock"])


def run_instances(ec2: Any, spec: dict, count: int, spot: Union[bool, str], token: str,
                  launched: list[Instance]) -> None:
    """Launch count instances of spec, appending each to launched as it comes (so that
    the caller can terminate them whatever happens)."""
    if spot:
        got = _batches(ec2, dict(spec, InstanceMarketOptions=SPOT), count, f"{token}s",
                       launched, "spot")
        if got < count:
            if spot == "only":
                raise AWSError("InsufficientInstanceCapacity",
                               f"only {got} of {count} spot instances were launched "
                               f"(spot='only'): try another instance_type or subnet, later, "
                               "or spot=True to launch the shortfall on demand")
            log.warning("%d of %d spot instances launched; launching %d on demand", got,
                        count, count - got)
        else:
            log.info("%d spot instances launched", got)
    left = count - sum(1 for i in launched if i.lifecycle == "spot")
    if left > 0:
        got = _batches(ec2, spec, left, f"{token}d", launched, None)
        if got < left:
            raise AWSError("InsufficientInstanceCapacity",
                           f"EC2 launched {got} of {left} on-demand instances: try another "
                           "instance_type or subnet (availability zone), or later")


def _batches(ec2: Any, spec: dict, count: int, token: str, launched: list[Instance],
             market: Optional[str]) -> int:
    """run_instances until count came or EC2 has no capacity (only then, for spot: a
    shortfall); returns how many came."""
    got = 0
    call = 0
    while got < count:
        want = min(BATCH, count - got)
        call += 1
        try:
            reply = ec2.run_instances(MinCount=1, MaxCount=want, ClientToken=f"{token}{call}",
                                      **spec)
        except Exception as exc:
            err = explain(exc, f"launch {want} {spec['InstanceType']} instances"
                               + (" (spot)" if market else ""))
            if market and err.code in CAPACITY:
                log.info("no spot capacity: %s", err)
                return got
            raise err from exc
        for d in reply["Instances"]:
            instance = Instance.from_description(d)
            if market:
                instance.lifecycle = market
            launched.append(instance)
            got += 1
    return got
