"""python -m bigmachine: every command runs, and each has --help."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import bigmachine as bm
from tests.conftest import TIMING
from tests.obs_services import Work

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigmachine", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"], ["status"], ["version"]])
def test_help(command):
    done = cli(*command, "--help")
    assert done.returncode == 0 and "usage: python -m bigmachine" in done.stdout
    assert len(done.stdout.splitlines()) >= 4


def test_version():
    done = cli("version")
    assert done.returncode == 0 and done.stdout.startswith(f"bigmachine {bm.__version__}\n")
    assert "\nbuild: all " in done.stdout and "compiled modules in use" in done.stdout


def test_demo():
    done = cli("demo", "--machines", "2", "--samples", "2000000")
    assert done.returncode == 0, done.stderr
    assert "pi ≈ 3.1" in done.stdout and "on 2 machines" in done.stdout


def test_bench():
    done = cli("bench", "ping", "--rounds", "1", "--calls", "50", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "== ping" in done.stdout and "ratio call median / raw_unix median" in done.stdout


def test_bench_scripts_stay_thin_wrappers():
    done = subprocess.run([sys.executable, "bench/ping.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--rounds" in done.stdout


def test_status_once_and_watching():
    with bm.start(status_addr="127.0.0.1:0", **TIMING) as b:
        m, = b.start(1, services={"Work": Work()})
        m.call("Work.echo", 1)
        done = cli("status", b.status_url)
        assert done.returncode == 0, done.stderr
        assert "m0" in done.stdout and "RUNNING" in done.stdout and "Work.echo" in done.stdout
        watching = subprocess.Popen([sys.executable, "-m", "bigmachine", "status", b.status_url,
                                     "--watch", "0.3"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        watching.terminate()
        out, _ = watching.communicate(timeout=10)
        assert out.count("RUNNING") >= 2
    done = cli("status", b.status_url)  # the session is gone
    assert done.returncode == 1 and "cannot read the status" in done.stderr
    assert b.status_url.split("/")[3] not in done.stderr  # the page's token


def test_status_reads_the_url_from_the_environment():
    """Arguments are visible to every user of the host (/proc/PID/cmdline); the
    environment only to the same user."""
    with bm.start(status_addr="127.0.0.1:0", **TIMING) as b:
        done = subprocess.run([sys.executable, "-m", "bigmachine", "status"], cwd=ROOT,
                              env=dict(os.environ, BIGMACHINE_STATUS_URL=b.status_url),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("machine  state"), done.stdout
    done = cli("status")
    assert done.returncode == 2 and "BIGMACHINE_STATUS_URL" in done.stderr


def test_unknown_command_fails():
    assert cli("nonsense").returncode == 2
