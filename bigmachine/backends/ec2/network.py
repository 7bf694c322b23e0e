"""Which address the driver dials, and the cluster's own security group.

The driver dials an instance's IP address literal: its private one, its
public one, or with "auto" the public one when it has one. When no security
groups are given, the session makes one per cluster that admits the group
itself (the cluster's own machines) on the machines' ports, and the driver's
address, as each instance sees it, on the agent's and the machines' ports;
nothing else. It is deleted at shutdown.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import urllib.request
from typing import Any

from ...errors import Error
from .aws import explain
from .instances import TAG, TAG_CLUSTER, Instance

log = logging.getLogger("bigmachine.ec2")
CHECKIP = "https://checkip.amazonaws.com"


def dial_address(instance: Instance, address: str) -> str:
    """The address to dial, or "" while EC2 has not given the one asked for."""
    if address == "private":
        return instance.private_ip
    if address == "public":
        return instance.public_ip
    return instance.public_ip or (instance.private_ip if instance.state == "running" else "")


def route_source(ip: str) -> str:
    """This host's own address toward ip (a route lookup: nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return s.getsockname()[0]


def public_source() -> str:
    """This host's address as the internet sees it (through NAT)."""
    try:
        with urllib.request.urlopen(CHECKIP, timeout=5) as reply:
            return str(ipaddress.ip_address(reply.read().decode().strip()))
    except (OSError, ValueError) as exc:
        raise Error(f"cannot learn this driver's public address from {CHECKIP} ({exc}), "
                    "which the cluster's security group must admit: pass "
                    "security_groups= groups that admit it, or address='private'") from exc


def driver_source(instance: Instance, ip: str, deadline: float, cancel: threading.Event) -> str:
    """The address (as a /32) the instance at ip sees the driver come from: the public
    one when ip is the instance's public address, else this host's route source (its
    route may appear only as the instance comes up: retried until deadline)."""
    if ip == instance.public_ip and ip != instance.private_ip:
        return f"{public_source()}/32"
    while True:
        try:
            return f"{route_source(ip)}/32"
        except OSError as exc:
            if time.monotonic() > deadline:
                raise Error(f"this driver has no route to {instance.id} at {ip} ({exc}): "
                            "run it inside the VPC (or one peered with it), or pass "
                            "address='public'") from exc
            if cancel.wait(0.1):
                raise Error("the launch was cancelled") from None


def make_group(ec2: Any, vpc: str, cluster: str, first: int, last: int) -> str:
    """Make the cluster's security group, admitting the group itself (the machines) on
    ports first+1..last; `admit` opens it to the driver."""
    try:
        group = ec2.create_security_group(
            GroupName=f"bigmachine-{cluster}", VpcId=vpc,
            Description=f"bigmachine cluster {cluster}: its driver and its machines",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                {"Key": TAG, "Value": "true"}, {"Key": TAG_CLUSTER, "Value": cluster},
                {"Key": "Name", "Value": f"bigmachine {cluster[:8]}"}]}])["GroupId"]
    except Exception as exc:
        raise explain(exc, "make the cluster's security group") from exc
    try:
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": first + 1, "ToPort": last,
             "UserIdGroupPairs": [{"GroupId": group, "Description": "bigmachine machines"}]}])
    except Exception as exc:
        delete_group(ec2, group, 10.0)
        raise explain(exc, "open the cluster's security group to its machines") from exc
    return group


def admit(ec2: Any, group: str, cidr: str, first: int, last: int) -> None:
    """Open the group to the driver at cidr on ports first..last."""
    try:
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": first, "ToPort": last,
             "IpRanges": [{"CidrIp": cidr, "Description": "bigmachine driver"}]}])
    except Exception as exc:
        err = explain(exc, f"open the cluster's security group to this driver ({cidr})")
        if err.code != "InvalidPermission.Duplicate":
            raise err from exc


def delete_group(ec2: Any, group: str, wait: float) -> bool:
    """Delete a group, retrying while instances that use it terminate; False if it stays."""
    deadline = time.monotonic() + wait
    while True:
        try:
            ec2.delete_security_group(GroupId=group)
            return True
        except Exception as exc:
            err = explain(exc, f"delete the security group {group}")
            if err.code == "InvalidGroup.NotFound":
                return True
            if err.code != "DependencyViolation" or time.monotonic() > deadline:
                log.warning("%s; `python -m bigmachine ec2 cleanup` removes it later", err)
                return False
        time.sleep(2.0)
