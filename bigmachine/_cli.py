"""The command line: ``python -m bigmachine COMMAND [options]``.

    demo      estimate pi on a few local machines (bigmachine.examples.pi)
    bench     run a benchmark and print its table (bigmachine.bench)
    status    print the status table of a running driver, from its status page URL
    ec2       list or clean up the EC2 instances drivers left (ec2 list, ec2 cleanup)
    version   print the versions of bigmachine and its parts
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from ._status import Status
from ._version import __version__
from .bench import BENCHMARKS

STATUS_URL_VAR = "BIGMACHINE_STATUS_URL"  # where `status` finds the page's URL without an argument


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bigmachine", description="bigmachine: spread one Python program over "
        "many machines. Each command has --help.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "demo", help="estimate pi on a few local machines",
        description="Start local machines and estimate pi with them (bigmachine.examples.pi). "
        "Options after 'demo' go to the example: --machines N (default 4), --samples N.")

    bench = commands.add_parser(
        "bench", help="run a benchmark and print its table",
        description="Run one benchmark against its raw-socket baseline and print the table. "
        "Options after NAME go to the benchmark (try: bench NAME --help).",
        epilog="benchmarks:\n" + "\n".join(f"  {name:16} {text}" for name, text in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's options")

    status = commands.add_parser(
        "status", help="print a running driver's status table",
        description="Print the status table of a running session, read from its status page: "
        "the URL is b.status_url of a session started with status_addr='127.0.0.1:0' "
        "(it carries the page's token). On a shared host pass it in the environment "
        f"({STATUS_URL_VAR}) rather than as an argument: other users can read arguments.")
    status.add_argument("url", metavar="URL", nargs="?", default=None,
                        help=f"the status page, http://HOST:PORT/TOKEN/ (default: ${STATUS_URL_VAR})")
    status.add_argument("--watch", type=float, metavar="SECONDS", nargs="?", const=2.0,
                        help="print again every SECONDS (default 2) until interrupted")

    ec2 = commands.add_parser(
        "ec2", help="list or clean up the EC2 instances drivers left",
        description="Find bigmachine's EC2 instances by their tags, whichever driver launched "
        "them. Credentials and region come from boto3's usual chain.")
    ec2.add_argument("action", choices=("list", "cleanup"),
                     help="list: print them (cluster, age, state, type); cleanup: say what "
                     "will be terminated, terminate it, delete unused cluster security groups")
    ec2.add_argument("--cluster", metavar="ID", help="only this cluster's (its tag "
                     "bigmachine:cluster)")
    ec2.add_argument("--older-than", metavar="AGE", help="cleanup: only instances older than "
                     "AGE, e.g. 30m, 1h, 2d")
    ec2.add_argument("--region", help="the AWS region (default: boto3's chain)")
    ec2.add_argument("--endpoint-url", metavar="URL", help="an AWS-compatible endpoint "
                     "(moto, LocalStack)")

    commands.add_parser("version", help="print the versions of bigmachine and its parts",
                        description="Print the versions of bigmachine, Python and the "
                        "compiled wire and decoder modules in use, and whether every "
                        "module the build compiles runs compiled.")

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from .examples import pi

        pi.main(rest)
    elif args.command == "bench":
        importlib.import_module(f"bigmachine.bench.{args.name}").main(args.args)
    elif args.command == "status":
        url = args.url or os.environ.get(STATUS_URL_VAR)
        if not url:
            parser.error(f"status needs the page's URL: an argument, or ${STATUS_URL_VAR}")
        return _status(url, args.watch)
    elif args.command == "ec2":
        return _ec2(args)
    elif args.command == "version":
        from . import _compiled, _decoder, _wire

        print(f"bigmachine {__version__}")
        print(f"python {sys.version.split()[0]} ({sys.executable})")
        print(f"wire module {_wire.__file__}")
        print(f"decoder module {_decoder.__file__}")
        print(f"build: {_compiled.describe()}")
    return 0


def _ec2(args: argparse.Namespace) -> int:
    from .backends.ec2 import cli
    from .backends.ec2.aws import AWS
    from .errors import Error

    try:
        aws = AWS(args.region, args.endpoint_url)
        if args.action == "list":
            if args.older_than:
                raise Error("--older-than is for cleanup")
            return cli.list_instances(aws, args.cluster, sys.stdout)
        older = cli.parse_age(args.older_than) if args.older_than else None
        return cli.cleanup(aws, args.cluster, older, sys.stdout)
    except Error as exc:
        print(f"python -m bigmachine ec2 {args.action}: {exc}", file=sys.stderr)
        return 1


def _without_token(url: str) -> str:
    """url with its first path segment (the status page's token) hidden."""
    parts = urllib.parse.urlsplit(url)
    _, _, rest = parts.path.lstrip("/").partition("/")
    return urllib.parse.urlunsplit(parts._replace(path=f"/TOKEN/{rest}"))


def _status(url: str, watch: Optional[float]) -> int:
    """Print the status table once, or every watch seconds."""
    source = url if url.endswith("status.json") else url.rstrip("/") + "/status.json"
    while True:
        try:
            with urllib.request.urlopen(source, timeout=30) as reply:
                table = str(Status.from_dict(json.load(reply)))
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            print(f"cannot read the status at {_without_token(source)}: {exc}", file=sys.stderr)
            return 1
        if watch is None:
            print(table)
            return 0
        if sys.stdout.isatty():
            print("\033[H\033[2J", end="")  # clear the terminal between tables
        print(f"{time.strftime('%H:%M:%S')}\n{table}\n", flush=True)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0
