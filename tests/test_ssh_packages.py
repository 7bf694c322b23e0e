"""Packages shipped to SSH hosts (issue 17), against the real sshd of tests/test_ssh.py.

No index is used: the tests build small pure-Python wheels (tests/wheels.py)
and point pip at them with pip_options. The "host" is the plain venv with
only numpy and cloudpickle, or one that also has bmtiny 1.0.
"""
from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import bigmachine as bm
from bigmachine.backends._bundle import Bundle
from bigmachine.backends._packages import driver_requirements
from tests import sshd as sshd_fixture
from tests.package_services import Packaged
from tests.test_ssh_netns import TIMING as NETNS_TIMING
from tests.test_ssh_netns import lab  # noqa: F401 (the netns hosts)
from tests.wheels import make_wheel

pytestmark = pytest.mark.timeout(180)
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheels")
    make_wheel(root, "bmtiny", "1.0", "VERSION = '1.0'\n")
    make_wheel(root, "bmtiny", "2.0", "VERSION = '2.0'\n")
    make_wheel(root, "bmplat", "1.0", "VERSION = '1.0'\n", tag="cp311-cp311-macosx_11_0_arm64")
    return root


@pytest.fixture
def code(tmp_path):
    root = tmp_path / "code"
    (root / "tests").mkdir(parents=True)
    for name in ("__init__.py", "ssh_services.py", "package_services.py"):
        (root / "tests" / name).write_bytes((HERE / name).read_bytes())
    return root


def offline(wheels: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheels)]


def where(ssh) -> dict:
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Packaged": Packaged()}, timeout=90)
        return m.call("Packaged.where", timeout=10)


def test_a_package_the_host_lacks_is_shipped_once_and_machines_run_in_its_env(
        system, code, wheels, venv, tmp_path):
    cdir = tmp_path / "c"
    wheel = str(wheels / "bmtiny-1.0-py3-none-any.whl")

    def make():
        return system(cache_dir=str(cdir), user_paths=[str(code)], packages=[wheel],
                      pip_options=["--no-index"])

    first = make()
    seen = where(first)
    env = Path(first.envs[0][1]).parent.parent
    assert seen["version"] == "1.0"
    assert env.parent == cdir / "envs" and seen["bmtiny"].startswith(str(env) + "/")
    assert seen["prefix"] == str(env)  # the machine runs the env's interpreter
    assert seen["numpy"].startswith(str(Path(venv).parent.parent))  # the host's own numpy
    labels = [label for _, label, _, _ in first.uploads]
    assert labels == ["bigmachine", str(code), "packages", "pip"]
    print(f"\nfirst start: uploaded {sum(n for *_, n in first.uploads)} bytes, "
          f"built the env in {first.envs[0][2]:.1f} s")

    second = make()
    assert where(second)["version"] == "1.0"
    assert second.uploads == []  # a second start ships nothing
    assert second.envs[0][3] is None and second.envs[0][1] == first.envs[0][1]
    print(f"second start: uploaded nothing, env checked in {second.envs[0][2]:.2f} s")


def test_a_pinned_version_shadows_the_hosts_and_an_unpinned_one_reuses_it(
        system, code, wheels, tmp_path):
    import cloudpickle

    host = sshd_fixture.make_venv(tmp_path / "host", [
        f"numpy=={np.__version__}", f"cloudpickle=={cloudpickle.__version__}",
        str(wheels / "bmtiny-1.0-py3-none-any.whl")])
    cdir = tmp_path / "c"
    pinned = where(system(python=host, cache_dir=str(cdir), user_paths=[str(code)],
                          packages=["bmtiny==2.0"], pip_options=offline(wheels)))
    assert pinned["version"] == "2.0" and pinned["bmtiny"].startswith(str(cdir / "envs"))
    unpinned = where(system(python=host, cache_dir=str(cdir), user_paths=[str(code)],
                            packages=["bmtiny"], pip_options=offline(wheels)))
    assert unpinned["version"] == "1.0"
    assert unpinned["bmtiny"].startswith(str(tmp_path / "host"))


def test_a_package_without_a_wheel_for_the_host_fails_the_start_before_launch(
        system, code, wheels, tmp_path):
    ssh = system(cache_dir=str(tmp_path / "c"), user_paths=[str(code)], packages=["bmplat"],
                 pip_options=offline(wheels))
    started = time.monotonic()
    with pytest.raises(bm.Error, match=r"no wheel of bmplat for manylinux_2_\d+_x86_64, "
                                       r"Python 3\.\d+ \(cp3\d+\); pip said") as info:
        where(ssh)
    assert time.monotonic() - started < 30
    assert "No matching distribution found for bmplat" in str(info.value)
    assert ssh.uploads == [] and ssh.envs == []
    assert not (tmp_path / "c" / "run").exists() or not any((tmp_path / "c" / "run").iterdir())


def test_a_requirements_file_naming_a_local_wheel_installs_on_the_host(
        system, code, tmp_path, monkeypatch):
    # packages=["./dist/x.whl"] is rewritten to the wheel's name in the shipped bundle, but
    # a requirements file's lines are shipped as they are: pip download on the driver finds
    # ./dist/x.whl, pip install on the host (cwd: the wheels bundle) does not.
    (code / "tests" / "package_services.py").write_bytes(
        (HERE / "package_services.py").read_bytes())
    project = tmp_path / "project"
    (project / "dist").mkdir(parents=True)
    wheel = make_wheel(project / "dist", "bmtiny", "1.0", "VERSION = '1.0'\n")
    requirements = project / "requirements.txt"
    requirements.write_text(f"./dist/{wheel.name}\n")
    monkeypatch.chdir(project)
    ssh = system(cache_dir=str(tmp_path / "c"), user_paths=[str(code)],
                 requirements=str(requirements), pip_options=["--no-index"])
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Packaged": Packaged()}, timeout=90)
        assert m.call("Packaged.where", timeout=10)["version"] == "1.0"


def test_the_host_installs_the_wheels_the_driver_shipped_not_its_own_pip_configs(
        system, code, venv, tmp_path):
    # The env is keyed by the hash of the shipped wheels, but the host's pip install runs
    # with the host's pip configuration (pip.conf, PIP_* variables): a host whose pip config
    # has find-links (as this machine's /root/.config/pip/pip.conf has) installs what it
    # finds there instead of what the driver resolved and shipped. The python= argv sets
    # PIP_FIND_LINKS for the host's side, standing in for such a pip.conf.
    (code / "tests" / "package_services.py").write_bytes(
        (HERE / "package_services.py").read_bytes())
    driver_wheels = tmp_path / "driver-wheels"
    driver_wheels.mkdir()
    make_wheel(driver_wheels, "bmtiny", "1.0", "VERSION = '1.0'\n")
    host_wheels = tmp_path / "host-wheels"
    host_wheels.mkdir()
    make_wheel(host_wheels, "bmtiny", "2.0", "VERSION = 'from the host'\n")
    ssh = system(cache_dir=str(tmp_path / "c"), user_paths=[str(code)], packages=["bmtiny"],
                 pip_options=["--no-index", "--find-links", str(driver_wheels)],
                 python=["env", f"PIP_FIND_LINKS={host_wheels}", venv])
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Packaged": Packaged()}, timeout=90)
        assert m.call("Packaged.where", timeout=10)["version"] == "1.0"


def test_a_corrupted_env_is_detected_and_rebuilt(system, code, wheels, tmp_path):
    cdir = tmp_path / "c"

    def make():
        return system(cache_dir=str(cdir), user_paths=[str(code)], packages=["bmtiny==2.0"],
                      pip_options=offline(wheels))

    first = make()
    module = Path(where(first)["bmtiny"])
    module.write_text("VERSION = 'tampered'\n")
    second = make()
    assert where(second)["version"] == "2.0"
    assert "differs from its manifest" in second.envs[0][3]
    assert second.uploads == []


def test_packages_driver_ships_what_the_code_imports_at_the_drivers_versions(
        system, code, wheels, tmp_path, monkeypatch):
    site = tmp_path / "driver-site"  # bmtiny 2.0 "installed" in the driver's environment
    with zipfile.ZipFile(wheels / "bmtiny-2.0-py3-none-any.whl") as z:
        z.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    assert driver_requirements([Bundle(str(code), {
        "tests/package_services.py": (code / "tests" / "package_services.py").read_bytes(),
        "tests/own.py": b"import os, tests, bigmachine\nfrom . import x\n"})]) == [
        "bmtiny==2.0", f"numpy=={np.__version__}"]
    # code that imports only bmtiny (numpy has no wheel offline), as a user module
    mine = tmp_path / "mine"
    (mine / "drvsvc").mkdir(parents=True)
    (mine / "drvsvc" / "__init__.py").write_text(
        "import bigmachine as bm\n\n\n@bm.service\nclass Tiny:\n"
        "    def version(self):\n        import bmtiny\n        return bmtiny.VERSION\n")
    monkeypatch.syspath_prepend(str(mine))
    from drvsvc import Tiny

    ssh = system(cache_dir=str(tmp_path / "c"), user_paths=[str(mine)], packages="driver",
                 pip_options=offline(wheels))
    with bm.start(ssh) as b:
        m, = b.start(1, services={"Tiny": Tiny()}, timeout=90)
        assert m.call("Tiny.version", timeout=10) == "2.0"


def test_local_checks_packages_against_the_drivers_environment():
    bm.Local(packages=["numpy", f"numpy=={np.__version__}"]).shutdown()
    with pytest.raises(bm.Error, match="lacks bmtiny, numpy==0.0.1"):
        bm.Local(packages=["bmtiny", "numpy==0.0.1", "cloudpickle"])


def test_packages_options_are_checked(tmp_path):
    with pytest.raises(bm.Error, match="packages must be"):
        bm.SSH(hosts=["h"], packages="numpy")
    with pytest.raises(bm.Error, match="no such file"):
        bm.SSH(hosts=["h"], requirements=str(tmp_path / "missing.txt"))
    with pytest.raises(bm.Error, match="pip_options"):
        bm.SSH(hosts=["h"], packages=["x"], pip_options="--no-index")
    assert sys.version_info[:2] >= (3, 9)


def test_packages_reach_network_namespace_hosts_without_internet(lab, code, wheels):
    """Both hosts of the netns lab (no route out): the wheel is shipped, installed, used."""
    ssh = bm.SSH(hosts=[h.addr for h in lab.hosts], key_filename=str(lab.client_key),
                 known_hosts=str(lab.known_hosts), python=sys.executable, agent=False,
                 cache_dir=str(lab.cache), user_paths=[str(code)], connect_timeout=5.0,
                 packages=["bmtiny==1.0"], pip_options=offline(wheels), **NETNS_TIMING)
    with bm.start(ssh) as b:
        machines = b.start(2, services={"Packaged": Packaged()}, timeout=90)
        for m in machines:
            seen = m.call("Packaged.where", timeout=10)
            assert seen["version"] == "1.0"
            assert seen["bmtiny"].startswith(str(lab.cache / "envs"))
    assert sorted(host for host, *_ in ssh.envs) == sorted(h.addr for h in lab.hosts)
