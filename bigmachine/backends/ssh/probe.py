"""What the probe (remote/probe.py) found on a host, checked: the host's Python
must be the driver's major.minor with numpy and cloudpickle; and the address
its machines listen on."""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional

from ...errors import Error
from .._remote import indent

log = logging.getLogger("bigmachine.ssh")

MIN_PYTHON = (3, 9)
REQUIRED = ("numpy", "cloudpickle")


def check_probe(label: str, python: str, status: int, out: bytes, err: bytes) -> dict:
    """The probe's report from host label, or an Error saying what to fix there."""
    text = err.decode("utf-8", "replace").strip()
    if status == 127:
        raise Error(f"no Python on {label}: `{python}` was not found"
                    + (f" ({text.splitlines()[-1]})" if text else "")
                    + "; pass SSH(python=...) naming an interpreter there")
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
                    "(pickles and the protocol depend on it); pass SSH(python=...)")
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


def bind_address(label: str, probe: dict, bind: Optional[str], tunnel: bool) -> str:
    """The address machines on host label listen on."""
    if bind:
        return bind
    if tunnel:
        return "127.0.0.1"
    fields = probe.get("ssh_connection", "").split()
    if len(fields) >= 3:
        addr = fields[2]
        if addr.lower().startswith("::ffff:") and addr.count(".") == 3:
            addr = addr[7:]  # an IPv4 client of a dual-stack sshd
        return addr
    raise Error(f"cannot tell which address of {label} to listen on (no "
                "SSH_CONNECTION); pass SSH(bind=...)")
