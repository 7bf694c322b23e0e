"""EC2: machines on EC2 instances (boto3), bootstrapped from user-data with
nothing secret in it.

A launch looks up the instance type, AMI (ami=None: the latest Amazon Linux
2023, whose setup installs the driver's Python), subnet and groups (so a
wrong one fails in seconds), makes the cluster's security group unless
groups were given, and runs run_instances in batches (spot first with
spot=True, the shortfall on demand). Each instance's user-data (remote/ec2_user_data.sh)
raises its open-file limit, writes setup= and starts a small agent
(remote/ec2_agent.py) with a one-time TLS key and the hash of a one-time
token. The driver dials the instance's IP address (private, public or auto)
until the agent listens, pins its certificate, proves itself with the token
(the agent then accepts nobody else), ships the bundles into the instance's
cache as SSH does (_hostprep, _remote.HostCache over the agent's "run"), and
has the agent start each machine with its bootstrap on stdin: the cluster's
credentials and its own certificate travel inside TLS, never in user-data.
Machines listen on the instance's private address, one port per slot after
the agent's, and the driver reaches them directly; their output comes back
over the agent's link. The agent powers the instance off (shutdown behaviour
"terminate") when its machines are done, or at boot_timeout if no driver
came: an orphan ends within its lease even when its driver is gone.

A machine whose link breaks makes the monitor look at its instance (one
batched describe_instances for all of them, at most once a second), so a
reclaimed or terminated instance is MachineLost with EC2's reason.
b.shutdown() terminates every instance and waits until EC2 reports them
going; `python -m bigmachine ec2 list|cleanup` finds them again by tag.
boto3 is imported only when an EC2 system first talks to AWS.

Modules: system (EC2), launch (checks, run_instances), image (the default
AMI and its Python), instances (tags, states, terminate, find), network
(addresses, security group), userdata (the script and its one-time
material), link (the driver's side of the agent), process (a machine, its
instance), monitor (describes), aws (clients, errors), cli (ec2
list|cleanup).
"""
from .system import EC2

__all__ = ["EC2"]
