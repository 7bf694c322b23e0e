"""Headless Chromium for the status page test, installed from Debian when missing.

As `tests/sshd.py` does for sshd: when chromium is missing and we are root,
`ensure_chromium` installs Debian's package; otherwise, or if that fails, it
raises, and the test fails saying why. It never skips.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from tests.sshd import FixtureError, _run

NAMES = ("chromium", "chromium-browser")


def ensure_chromium() -> str:
    """The path of a chromium binary, installing Debian's chromium first if needed."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() != 0:
        raise FixtureError("chromium is missing and we are not root: install Debian's chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], timeout=900, env=env)
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise FixtureError("Debian's chromium installed, but no chromium binary is on PATH")


def render(chromium: str, url: str, timeout: float = 60) -> tuple[str, list[str]]:
    """Load url headless; return the DOM after its scripts ran, and its console messages."""
    try:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", url],
            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise FixtureError(f"chromium did not render {url} within {timeout} s") from exc
    if done.returncode != 0:
        raise FixtureError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console
