"""`python -m bigmachine ec2 list|cleanup`: instances any driver left, found by tag."""
from __future__ import annotations

import datetime
import re
from typing import IO, Optional

from ...errors import Error
from .aws import AWS, explain
from .instances import TAG, TAG_CLUSTER, Instance, find, terminate
from .network import delete_group

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """"90s", "30m", "1h", "2d" -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise Error(f"--older-than {text!r}: write a number and a unit, e.g. 30m, 1h or 2d")
    return float(m[1]) * UNITS[m[2]]


def age(instance: Instance, now: datetime.datetime) -> float:
    return (now - instance.launched).total_seconds() if instance.launched else 0.0


def table(instances: list[Instance], now: datetime.datetime) -> str:
    rows = [("INSTANCE", "CLUSTER", "AGE", "STATE", "TYPE", "ADDRESS")]
    for i in sorted(instances, key=lambda i: (i.cluster, i.id)):
        rows.append((i.id, i.cluster[:16], shown_age(age(i, now)), i.state, i.type,
                     i.private_ip or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def shown_age(seconds: float) -> str:
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def list_instances(aws: AWS, cluster: Optional[str], out: IO[str]) -> int:
    """Print bigmachine's instances (of one cluster when given) that are not terminated."""
    found = find(aws.ec2, cluster)
    now = datetime.datetime.now(datetime.timezone.utc)
    print(table(found, now) if found else "no bigmachine instances", file=out)
    return 0


def cleanup(aws: AWS, cluster: Optional[str], older_than: Optional[float], out: IO[str]) -> int:
    """Say what will be terminated, terminate it, and delete the clusters' security groups
    that nothing uses any more."""
    now = datetime.datetime.now(datetime.timezone.utc)
    found = [i for i in find(aws.ec2, cluster) if i.state != "shutting-down"
             and (older_than is None or age(i, now) >= older_than)]
    if found:
        print(f"terminating {len(found)} instance(s):\n{table(found, now)}", file=out, flush=True)
        terminate(aws.ec2, [i.id for i in found], wait=120.0)
        print("terminated", file=out)
    else:
        print("no bigmachine instances to terminate", file=out)
    filters = [{"Name": f"tag:{TAG}", "Values": ["true"]}]
    if cluster:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
    try:
        groups = aws.ec2.describe_security_groups(Filters=filters)["SecurityGroups"]
    except Exception as exc:
        raise explain(exc, "list bigmachine's security groups") from exc
    busy = {i.cluster for i in find(aws.ec2)}
    for group in groups:
        owner = {t["Key"]: t["Value"] for t in group.get("Tags", ())}.get(TAG_CLUSTER, "")
        if owner not in busy:
            print(f"deleting the security group {group['GroupId']} of cluster {owner}",
                  file=out)
            delete_group(aws.ec2, group["GroupId"], 60.0)
    return 0
