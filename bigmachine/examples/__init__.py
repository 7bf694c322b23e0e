"""Runnable examples: ``python -m bigmachine.examples.NAME --help``.

- ``pi``: the smallest one; machines stream counts back to the driver.
- ``kvstore``: a sharded key-value store of actors; a machine stops mid-run
  and its shard is rebuilt from the others' copies.
- ``shuffle``: a distributed sort; machines exchange partitions directly.
- ``parameter_server``: a server machine pulls gradients from workers'
  streams and pushes weights back; cancellation and timeouts.

What the examples share lives here: choosing the system from the command line.
"""
from __future__ import annotations

import argparse

import bigmachine as bm


def add_system_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --system and the SSH options (--hosts, ...) to an example's parser."""
    parser.add_argument("--system", choices=("local", "ssh"), default="local",
                        help="where machines run: child processes here (default) or SSH hosts")
    parser.add_argument("--hosts", default="",
                        help="with --system ssh: comma-separated [user@]host[:port] list")
    parser.add_argument("--machines-per-host", type=int, default=1,
                        help="with --system ssh: machines each host may run (default 1)")
    parser.add_argument("--accept-new-hosts", action="store_true",
                        help="with --system ssh: trust hosts missing from ~/.ssh/known_hosts")


def system_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bm.System:
    """The System that the parsed --system options ask for (exits on a bad combination)."""
    hosts = [h for h in args.hosts.split(",") if h]
    if args.system == "local":
        if hosts:
            parser.error("--hosts needs --system ssh")
        return bm.Local()
    if not hosts:
        parser.error("--system ssh needs --hosts")
    return bm.SSH(hosts, machines_per_host=args.machines_per_host,
                  accept_new_hosts=args.accept_new_hosts)
