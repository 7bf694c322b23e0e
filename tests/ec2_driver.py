"""A driver in its own process for the EC2 tests that kill or interrupt it:
python -m tests.ec2_driver JSON (EC2 options). It starts one machine, prints
``running CLUSTER`` once it runs, then waits to be killed."""
import json
import sys
import time

import bigmachine as bm
from tests.ssh_services import Remote

options = json.loads(sys.argv[1])
timing = {k: options.pop(k) for k in ("keepalive_period", "lost_after", "lease")}
b = bm.start(bm.EC2(**options), **timing)
print("cluster", b.node.creds.cluster_id.hex(), flush=True)
b.start(1, {"Remote": Remote()})
print("running", flush=True)
time.sleep(600)
