"""SSH host keys: checked against an OpenSSH known_hosts file, never trusted blindly.

A host whose key is not in the file is refused unless accept_new_hosts, which
appends it; a host whose key differs from the recorded one (or that offers
a key of another type than the recorded one) is always refused.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import threading
from typing import Any

from ...errors import AuthError

log = logging.getLogger("bigmachine.ssh")
_append_lock = threading.Lock()  # one writer of known_hosts files at a time in this process


def known_name(host: str, port: int) -> str:
    """How known_hosts names host:port."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: Any) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def changed_key_error(label: str, host: str, port: int, known: str, exc: Any) -> AuthError:
    """The refusal of a host whose key is not the one known_hosts records (BadHostKeyException)."""
    return AuthError(
        label,
        f"its host key CHANGED: known_hosts {known} has "
        f"{exc.expected_key.get_name()} {exc.expected_key.get_base64()[:24]}... but the "
        f"host offered {exc.key.get_name()} {exc.key.get_base64()[:24]}...; someone may "
        "be intercepting the connection. If the change is expected, remove the old line "
        f"(ssh-keygen -R {shlex.quote(known_name(host, port))} -f {known})")


class HostKeyPolicy:
    """paramiko's missing-host-key hook: refuse, or with accept_new, record."""

    def __init__(self, known: str, accept_new: bool, label: str, host: str, port: int):
        self.known = known
        self.accept_new = accept_new
        self.label = label
        self.host = host
        self.port = port

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        known = self.known
        others = client.get_host_keys().lookup(hostname)
        if others:  # a key of another type is known: treat as changed, never accept
            raise AuthError(self.label, f"its host key CHANGED: known_hosts {known} has "
                            f"{', '.join(others.keys())} for {hostname} but the host offered "
                            f"{key.get_name()}; remove the old line if the change is expected")
        shown = fingerprint(key)
        if not self.accept_new:
            raise AuthError(self.label, f"its host key ({key.get_name()} {shown}) is not "
                            f"in known_hosts {known}; check the fingerprint and add it (ssh-keyscan "
                            f"-p {self.port} {self.host} >> {known}), or pass "
                            "accept_new_hosts=True")
        with _append_lock:
            directory = os.path.dirname(known)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(known, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("SSH host %s: accepted new host key %s %s into %s",
                    self.label, key.get_name(), shown, known)
