"""The SSH tests' shared fixtures: one real sshd on loopback, the venvs that stand
for remote Pythons, a cache dir, and a factory of SSH systems for them. conftest.py
imports them, so every test module of a worker shares one of each."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import bigmachine as bm
from tests import sshd as sshd_fixture

# Short timings: failures are noticed fast, generous enough for 2 loaded cores.
TIMING = dict(keepalive_period=0.25, lost_after=5.0, lease=10.0)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = sshd_fixture.Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def venv(tmp_path_factory):
    """A plain venv with only numpy and cloudpickle, at the driver's versions."""
    import cloudpickle

    python = sshd_fixture.make_venv(
        tmp_path_factory.mktemp("venv") / "venv",
        [f"numpy=={np.__version__}", f"cloudpickle=={cloudpickle.__version__}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    found = subprocess.run([python, "-c", "import bigmachine"], capture_output=True, timeout=30,
                           cwd=Path(python).parent, env=env)
    assert found.returncode != 0, "the test venv must not see bigmachine"
    return python


@pytest.fixture(scope="session")
def bare_venv(tmp_path_factory):
    """A plain venv with nothing installed."""
    return sshd_fixture.make_venv(tmp_path_factory.mktemp("bare") / "venv", [])


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def system(sshd, venv, cache):
    """Make an SSH system for the test sshd; keyword arguments override."""

    def make(**kwargs):
        options = dict(hosts=[f"{sshd.host}:{sshd.port}"], key_filename=str(sshd.client_key),
                       known_hosts=str(sshd.known_hosts), python=venv, agent=False,
                       cache_dir=str(cache), connect_timeout=5.0, **TIMING)
        options.update(kwargs)
        return bm.SSH(**options)

    return make
