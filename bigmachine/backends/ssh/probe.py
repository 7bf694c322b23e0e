"""The address machines on an SSH host listen on, from what the probe
(remote/probe.py, checked by _hostprep) found there."""
from __future__ import annotations

from typing import Optional

from ...errors import Error


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
