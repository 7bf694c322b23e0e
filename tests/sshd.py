"""Real parts for the SSH tests: an OpenSSH sshd on a loopback port, and venvs.

`Sshd` starts ``/usr/sbin/sshd`` in the foreground on 127.0.0.1 with a host
key, a client key and an authorized_keys file made for the run in a temp
dir, and a known_hosts file that lists the host key under ``[127.0.0.1]:port``.
If sshd is missing and we are root, `ensure_sshd` installs Debian's
openssh-server; otherwise, or if that fails, it raises: the SSH tests fail
loudly, they never skip.

`make_venv` makes a plain venv (no system site-packages) of this interpreter
and installs packages into it with this interpreter's pip, so the "remote"
Python has only what the test put there.

Plain functions and classes, no pytest, so that the tests' fixtures stay thin.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

SSHD = "/usr/sbin/sshd"


class FixtureError(RuntimeError):
    """The test environment could not be built: fail, do not skip."""


def _run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise FixtureError(f"{' '.join(argv)} did not finish within {timeout} s") from exc
    if done.returncode != 0:
        raise FixtureError(f"{' '.join(argv)} failed with status {done.returncode}:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def ensure_sshd() -> str:
    """The path of sshd, installing openssh-server first when missing and root."""
    if os.path.exists(SSHD):
        return SSHD
    if os.geteuid() != 0:
        raise FixtureError(f"{SSHD} is missing and we are not root: install openssh-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
         timeout=600, env=env)
    if not os.path.exists(SSHD):
        raise FixtureError(f"openssh-server installed but {SSHD} is still missing")
    return SSHD


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "bigmachine-test") -> str:
    """Make an ed25519 key pair at path (and path.pub); return the public key line."""
    for old in (path, path.with_name(path.name + ".pub")):
        if old.exists():
            old.unlink()
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
         timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


class Sshd:
    """One sshd on 127.0.0.1:port, its keys and files under root."""

    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.user = _username()
        self.host = host  # any loopback address: 127.0.0.2 is another "host"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.host_pub = keygen(self.host_key, "bigmachine-test-host")
        self.client_key = self.root / "id_ed25519"
        self.client_pub = keygen(self.client_key)
        self.authorized_keys = self.root / "authorized_keys"
        self.authorized_keys.write_text(self.client_pub + "\n")
        os.chmod(self.authorized_keys, 0o600)
        self.known_hosts = self.root / "known_hosts"
        self.log = self.root / "sshd.log"

    def known_hosts_line(self, pub: Optional[str] = None) -> str:
        keytype, blob = (pub or self.host_pub).split()[:2]
        return f"[{self.host}]:{self.port} {keytype} {blob}"

    def start(self, timeout: float = 20.0) -> "Sshd":
        sshd = ensure_sshd()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        last = ""
        for _ in range(5):  # the free port may be taken between our probe and sshd's bind
            self.port = free_port(self.host)
            config = self.root / "sshd_config"
            config.write_text(_CONFIG.format(
                port=self.port, host=self.host, host_key=self.host_key, authorized_keys=self.authorized_keys,
                user=self.user, pid=self.root / "sshd.pid"))
            log = open(self.log, "ab")
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
            log.close()
            if self._await_banner(timeout):
                self.known_hosts.write_text(self.known_hosts_line() + "\n")
                return self
            last = self.log.read_text(errors="replace")[-2000:]
            self.stop()
        raise FixtureError(f"sshd did not start; its log:\n{last}")

    def _await_banner(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self.proc = None


_CONFIG = """\
Port {port}
ListenAddress {host}
HostKey {host_key}
PidFile {pid}
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
"""


def _username() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def make_venv(path: Path, packages: list[str], timeout: float = 300.0) -> str:
    """A plain venv of this interpreter at path with packages; returns its python."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=60)
    python = str(path / "bin" / "python")
    if packages:
        _run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
              "--disable-pip-version-check", *packages], timeout=timeout)
    return python


def other_python() -> Optional[str]:
    """The oldest Python 3 on this machine whose major.minor differs from ours."""
    candidates = []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += sorted(str(p / "bin" / "python") for p in pyenv.iterdir())
    candidates += [f"/usr/bin/python3.{minor}" for minor in range(6, 20)]
    found = []
    for exe in candidates:
        if not os.access(exe, os.X_OK):
            continue
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if len(out) == 2 and out[0] == "3" and int(out[1]) != sys.version_info[1]:
            found.append((int(out[1]), exe))
    return min(found)[1] if found else None
