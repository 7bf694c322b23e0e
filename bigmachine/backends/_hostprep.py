"""Preparing a host for machines, whatever reaches it (SSH, an EC2 agent).

The same steps for every remote host: probe its Python (remote/probe.py) and
check it, ship the bundles it lacks into its cache (HostCache), make the
packages' environment when asked, and say how a machine starts there: the
launch plan, the worker's argv and its config (see _worker).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import Error
from ._bundle import Bundle, bigmachine_bundle
from ._packages import Packages, env_key, pip_bundle
from ._remote import HostCache, Run, indent, script

log = logging.getLogger("bigmachine")

MIN_PYTHON = (3, 9)
REQUIRED = ("numpy", "cloudpickle")
# Runs python= (which may wrap the interpreter, e.g. prlimit) on the env's interpreter.
LAUNCH_IN_ENV = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


@dataclass
class Plan:
    """How machines start on a prepared host."""

    probe: dict
    cache: str                  # the cache's path on the host
    bigmachine: str             # the bigmachine bundle's directory (PYTHONPATH)
    hold: list[str]             # cache entries a machine holds while it runs
    sys_path: list[str]
    python: Optional[str] = None  # the packages' env interpreter, if any
    sent: list[tuple[Bundle, int]] = field(default_factory=list)
    env: Optional[dict] = None  # the env op's answer, if any

    def argv(self, python_argv: Sequence[str]) -> list[str]:
        """The machine's command: python= (in the env when there is one), -m _worker."""
        inner = [] if self.python is None else ["-c", LAUNCH_IN_ENV, self.python]
        return list(python_argv) + inner + ["-m", "bigmachine._worker"]

    def config(self, run_dir: str, listen: str, system: Any) -> dict:
        """The worker's config line (less name and tls, which bootstrap() adds)."""
        return {
            "sys_path": self.sys_path,
            "cwd": run_dir,
            "hold": self.hold + [run_dir],
            "lease": system.lease,
            "keepalive_period": system.keepalive_period,
            "lost_after": system.lost_after,
            "socket_buffer": system.socket_buffer,
            "busy_poll": system.busy_poll,
            "parent_pipe": True,
            "listen": listen,
        }


def check_probe(label: str, python: str, status: int, out: bytes, err: bytes,
                option: str) -> dict:
    """The probe's report from host label, or an Error saying what to fix there;
    option names the system's python= (e.g. "SSH(python=...)")."""
    text = err.decode("utf-8", "replace").strip()
    if status == 127:
        raise Error(f"no Python on {label}: `{python}` was not found"
                    + (f" ({text.splitlines()[-1]})" if text else "")
                    + f"; pass {option} naming an interpreter there")
    try:
        probe = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        probe = None
    if status != 0 or not isinstance(probe, dict):
        raise Error(f"cannot run `{python}` on {label} (status {status})"
                    + (f":\n{indent(text)}" if text else ""))
    version = tuple(probe["version"][:2])
    ours = sys.version_info[:2]
    shown = ".".join(map(str, probe["version"]))
    if version < MIN_PYTHON:
        raise Error(f"{label} has Python {shown} at `{python}`, too old: bigmachine "
                    f"needs Python >= {'.'.join(map(str, MIN_PYTHON))}, and the same "
                    f"major.minor as the driver ({ours[0]}.{ours[1]})")
    if version != ours:
        raise Error(f"{label} has Python {shown} at `{python}`; the driver runs "
                    f"{ours[0]}.{ours[1]}: machines must run the same major.minor version "
                    f"(pickles and the protocol depend on it); pass {option}")
    missing = [name for name in REQUIRED if not probe["packages"].get(name)]
    if missing:
        raise Error(f"{label}: {probe['executable']} lacks {', '.join(missing)}; "
                    f"install {'them' if len(missing) > 1 else 'it'} there "
                    f"(pip install {' '.join(missing)})")
    import cloudpickle

    theirs = probe["packages"].get("cloudpickle")
    if theirs not in (cloudpickle.__version__, "unknown"):
        log.warning("%s has cloudpickle %s, the driver %s: functions and classes pickled "
                    "by value may not load there", label, theirs, cloudpickle.__version__)
    return probe


def prepare(label: str, run: Run, python_argv: Sequence[str], cache_dir: str,
            user: Sequence[Bundle], packages: Packages, build: str, keep: int,
            max_age: float, deadline: float, option: str) -> Plan:
    """Probe the host, ship what it lacks, make the packages' env; return the plan."""
    status, out, err = run(list(python_argv) + ["-c", script("probe"), cache_dir, *REQUIRED],
                           b"", deadline)
    probe = check_probe(label, " ".join(python_argv), status, out, err, option)
    ours = sysconfig.get_config_var("EXT_SUFFIX") or ""
    binaries = build == "auto" and probe["ext_suffix"] == ours
    bm, exts = bigmachine_bundle(probe["ext_suffix"], binaries)
    cache = HostCache(label, run, python_argv, probe["cache"])
    wanted = [(bm, {"build": "check" if binaries else "build", "exts": exts})]
    wanted += [(b, {}) for b in user]
    env_entry = []
    if packages:
        wheels, args = packages.resolve(probe, label, user)
        pip = pip_bundle()
        key = env_key(wheels, pip, args, probe)
        wanted += [(wheels, {}), (pip, {})]
        env_entry = [f"envs/{key}"]
    sent = cache.ship(wanted, deadline, keep, max_age, env_entry)
    for bundle, size in sent:
        log.info("shipped %s to %s (%d bytes)", bundle.label, label, size)
    dirs = [cache.where(cache.entry(b)) for b, _ in wanted[:1 + len(user)]]
    plan = Plan(probe, probe["cache"], dirs[0], list(dirs),
                dirs + [p for p in probe["path"] if p != dirs[0]], sent=sent)
    if env_entry:
        env = cache.env(key, wheels, pip, args, deadline)
        if env["rebuilt"]:
            log.warning("%s: rebuilt the environment %s: %s", label, env_entry[0],
                        env["rebuilt"])
        log.info("%s: environment %s ready in %.1f s", label, env_entry[0], env["seconds"])
        plan.python = env["python"]
        plan.env = env
        plan.hold = dirs + [cache.where(env_entry[0])]
        plan.sys_path = dirs + [p for p in env["path"] if p != dirs[0]]
    return plan


def run_dir(plan: Plan, launch_id: str, name: str) -> str:
    """A machine's own directory on the host: its cwd, with its TMPDIR inside."""
    return os.path.join(plan.cache, "run", launch_id, name)
