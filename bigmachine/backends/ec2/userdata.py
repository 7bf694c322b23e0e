"""An instance's user-data (remote/ec2_user_data.sh with the agent inside) and the
one-time material it holds.

User-data is readable by anything on the instance and by anyone allowed to
describe it, so it holds only what grants nothing once the driver has been
accepted or boot_timeout has passed: the agent's one-time TLS key (the
driver pins its certificate) and the sha256 of the one-time token with which
the driver proves itself. Neither is signed by or derived from the cluster's
CA or secret, so neither passes as a cluster member.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ...errors import Error
from .._remote import REMOTE_DIR, script
from .._shell import join

MAX_USER_DATA = 16 * 1024  # EC2's limit (moto does not enforce it)


@dataclass(frozen=True)
class OneTime:
    """The one-time bootstrap material of one launch batch."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    token: bytes = field(repr=False)

    @classmethod
    def generate(cls, lifetime: float) -> "OneTime":
        """A fresh key, its self-signed certificate (valid for lifetime s), and a token."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bigmachine agent")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(seconds=lifetime + 3600))
                .sign(key, hashes.SHA256()))
        ser = serialization
        return cls(cert.public_bytes(ser.Encoding.PEM),
                   key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                     ser.NoEncryption()),
                   os.urandom(32))

    @property
    def fingerprint(self) -> bytes:
        """The sha256 of the agent's certificate (DER): what the driver pins."""
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        return hashlib.sha256(
            x509.load_pem_x509_certificate(self.cert_pem).public_bytes(Encoding.DER)).digest()


def template() -> str:
    with open(os.path.join(REMOTE_DIR, "ec2_user_data.sh"), encoding="utf-8") as f:
        return f.read()


def user_data(one: OneTime, agent_argv: Sequence[str], setup: Optional[str], port: int,
              boot_timeout: float) -> str:
    """The user-data script of an instance whose agent (run by agent_argv, a Python
    there before setup) listens on port."""
    setup = (setup or "").rstrip("\n")
    if any(line.strip() == "BIGMACHINE_SETUP" for line in setup.splitlines()):
        raise Error("setup= may not contain a line BIGMACHINE_SETUP (it ends the setup "
                    "script inside the user-data)")
    config = json.dumps({"port": port, "boot_timeout": boot_timeout,
                         "cert": one.cert_pem.decode(), "key": one.key_pem.decode(),
                         "token_sha256": hashlib.sha256(one.token).hexdigest()})
    values = {"SETUP": setup, "PYTHON": join(agent_argv), "CONFIG": config,
              "AGENT": script("ec2_agent").rstrip("\n")}
    text = re.sub(r"@(SETUP|PYTHON|AGENT|CONFIG)@", lambda m: values[m[1]], template())
    size = len(text.encode())
    if size > MAX_USER_DATA:
        raise Error(f"the user-data would be {size} bytes, over EC2's limit of "
                    f"{MAX_USER_DATA}: shorten setup= ({len(setup.encode())} bytes), e.g. "
                    "by putting its steps in a script on the AMI")
    return text
