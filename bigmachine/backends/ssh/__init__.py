"""SSH: machines are processes on hosts the driver reaches with SSH (paramiko).

For each host the driver opens one SSH connection (more when a host runs
many machines: sshd allows 10 sessions per connection by default), checks
the host key against an OpenSSH known_hosts file, and probes the remote
Python: its version, platform tag (EXT_SUFFIX), numpy and cloudpickle, and
which code bundles the host already holds. It then ships what is missing:

- the bigmachine package: its .py and .pyx sources, plus the driver's own
  compiled extensions when the host's EXT_SUFFIX is the driver's. On the
  host, the unpack step imports the package; when the extensions are absent
  or do not load (another platform, an older C library) it builds them there
  with Cython, or fails saying what to install.
- the user's code: the driver's working directory and its sys.path entries
  that are not part of an installation (stdlib, site-packages), each walked
  for files matching `include` (default ``*.py``) less `exclude`.

Each bundle is a gzipped tar unpacked into the host's cache (remote/cache.py:
private directories, path and manifest checked before anything cached is
trusted, old entries pruned unless a running machine holds them) under
``<cache_dir>/bundles/<sha256 of its contents>``, so a later start (from this
driver or another) uploads nothing the host already has; `uploads` counts
what was sent. `python=` and every other value that reaches the remote shell
is quoted (backends/_shell.py).

Each machine is ``python -m bigmachine._worker`` started through an exec
channel (the account's login shell must be a POSIX shell), in its own run dir
``<cache_dir>/run/<launch>/<name>`` (its cwd and TMPDIR). Its bootstrap
(config line, the cluster credentials, and with TLS its own key and
certificate) goes over the channel's stdin, never argv or the environment;
stdin then stays open and the machine exits when it closes, that is when the
SSH session ends; without keepalives it also stops when its lease runs out.
The machine listens on the address the host was reached at (from sshd's
SSH_CONNECTION; `bind` overrides it) and reports that address as its first
stdout line; the driver connects to it directly, or with `tunnel` through a
local forwarding listener. Its output reaches the driver's stderr line by
line, prefixed with host and machine name. Stopping a machine removes its run
dir; the bundle cache stays.

Modules: hosts (connections, commands), hostkeys (known_hosts), probe (the
host's Python), process (a machine), tunnel (forwarding), system (SSH).
"""
from .system import SSH

__all__ = ["SSH"]
