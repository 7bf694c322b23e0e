"""EC2 instances as bigmachine sees them: their tags, their state, terminating them,
and finding them again by tag (for `python -m bigmachine ec2 list|cleanup`)."""
from __future__ import annotations

import datetime
import getpass
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .aws import explain

TAG = "bigmachine"                 # "true" on everything bigmachine makes
TAG_CLUSTER = "bigmachine:cluster"  # the cluster (session) id
TAG_LAUNCH = "bigmachine:launch"   # one b.start's launch, to find what a cut call made
GONE = ("shutting-down", "terminated", "stopping", "stopped")
CHUNK = 200  # instance ids per request


@dataclass
class Instance:
    """One instance: id, addresses, state and EC2's reason for it."""

    id: str
    type: str = ""
    private_ip: str = ""
    public_ip: str = ""
    state: str = "pending"
    reason: str = ""
    launched: Optional[datetime.datetime] = None
    cluster: str = ""
    lifecycle: str = "on-demand"  # or "spot"

    @classmethod
    def from_description(cls, d: dict) -> "Instance":
        tags = {t["Key"]: t["Value"] for t in d.get("Tags", ())}
        reason = (d.get("StateReason") or {}).get("Message") or d.get("StateTransitionReason", "")
        return cls(d["InstanceId"], d.get("InstanceType", ""), d.get("PrivateIpAddress", ""),
                   d.get("PublicIpAddress", ""), d["State"]["Name"], reason,
                   d.get("LaunchTime"), tags.get(TAG_CLUSTER, ""),
                   d.get("InstanceLifecycle", "on-demand"))

    @property
    def gone(self) -> bool:
        return self.state in GONE

    def describe_state(self) -> str:
        """E.g. "instance i-0abc terminated: Server.SpotInstanceTermination: ..."."""
        return f"instance {self.id} {self.state}" + (f": {self.reason}" if self.reason else "")


def name_tag(cluster: str) -> str:
    """The Name a person reads in the console: user, program, cluster."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = str(os.getuid())
    program = os.path.basename(sys.argv[0] or "python") or "python"
    return f"bigmachine {user} {program} {cluster[:8]}"


def tag_specifications(cluster: str, launch: str, tags: dict) -> list[dict]:
    """The TagSpecifications of run_instances: on the instances and their volumes."""
    pairs = dict(tags)
    pairs.update({"Name": name_tag(cluster), TAG: "true", TAG_CLUSTER: cluster,
                  TAG_LAUNCH: launch})
    listed = [{"Key": k, "Value": str(v)} for k, v in pairs.items()]
    return [{"ResourceType": kind, "Tags": listed} for kind in ("instance", "volume")]


def describe(ec2: Any, ids: Sequence[str]) -> dict[str, Instance]:
    """The instances of ids that EC2 still knows, by id."""
    found: dict[str, Instance] = {}
    for i in range(0, len(ids), CHUNK):
        chunk = list(ids[i:i + CHUNK])
        try:
            pages = ec2.get_paginator("describe_instances").paginate(InstanceIds=chunk)
            for page in pages:
                for reservation in page["Reservations"]:
                    for d in reservation["Instances"]:
                        found[d["InstanceId"]] = Instance.from_description(d)
        except Exception as exc:
            err = explain(exc, "describe instances")
            if not err.code.startswith("InvalidInstanceID"):
                raise err from exc
            for one in chunk:  # some are unknown (long gone): ask for each
                found.update(describe_one(ec2, one))
    return found


def describe_one(ec2: Any, instance_id: str) -> dict[str, Instance]:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except Exception as exc:
        err = explain(exc, "describe an instance")
        if err.code.startswith("InvalidInstanceID"):
            return {}
        raise err from exc
    return {d["InstanceId"]: Instance.from_description(d)
            for r in reservations for d in r["Instances"]}


def find(ec2: Any, cluster: Optional[str] = None, launch: Optional[str] = None,
         states: Iterable[str] = ("pending", "running", "stopping", "stopped",
                                  "shutting-down")) -> list[Instance]:
    """The instances bigmachine launched (of one cluster or launch when given)."""
    filters = [{"Name": f"tag:{TAG}", "Values": ["true"]},
               {"Name": "instance-state-name", "Values": list(states)}]
    if cluster:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
    if launch:
        filters.append({"Name": f"tag:{TAG_LAUNCH}", "Values": [launch]})
    found = []
    try:
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                found += [Instance.from_description(d) for d in reservation["Instances"]]
    except Exception as exc:
        raise explain(exc, "list bigmachine's instances") from exc
    return found


def terminate(ec2: Any, ids: Sequence[str], wait: float = 0.0) -> dict[str, Instance]:
    """Terminate instances; with wait, until EC2 reports each shutting down or gone
    (at most wait seconds). Returns what the last look found."""
    ids = list(dict.fromkeys(ids))
    for i in range(0, len(ids), CHUNK):
        try:
            ec2.terminate_instances(InstanceIds=ids[i:i + CHUNK])
        except Exception as exc:
            err = explain(exc, "terminate instances")
            if not err.code.startswith("InvalidInstanceID"):
                raise err from exc
            for one in ids[i:i + CHUNK]:  # one is unknown: the others still must go
                try:
                    ec2.terminate_instances(InstanceIds=[one])
                except Exception:
                    pass
    deadline = time.monotonic() + wait
    seen: dict[str, Instance] = {}
    while wait > 0:
        seen = describe(ec2, ids)
        if all(i.gone for i in seen.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return seen
