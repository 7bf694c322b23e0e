"""Every module imports on its own in a fresh interpreter (no import cycles),
and the public API is exactly what design.md names."""
import pkgutil
import subprocess
import sys

import pytest

import bigmachine as bm

MODULES = sorted(
    ["bigmachine"] + [f"bigmachine.{m.name}" for m in pkgutil.iter_modules(bm.__path__)]
    + [f"bigmachine.backends.{m.name}" for m in pkgutil.iter_modules(bm.backends.__path__)])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_public_api():
    for name in ["start", "current", "service", "B", "Machine", "State", "Local", "InProcess",
                 "SSH", "Error", "RemoteError", "MachineLost", "AuthError", "ProtocolError"]:
        assert hasattr(bm, name), name
    assert list(bm.State) == [bm.State.STARTING, bm.State.RUNNING, bm.State.STOPPED]
    for error in (bm.RemoteError, bm.MachineLost, bm.AuthError, bm.ProtocolError):
        assert issubclass(error, bm.Error)
    assert set(bm.__all__) <= set(dir(bm))
