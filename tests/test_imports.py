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


# What only a driver uses; a machine, and the template machines are forked from, never need it.
DRIVER_SIDE = {"bigmachine._start", "bigmachine._driver", "bigmachine._statuspage", "bigmachine._observe",
               "bigmachine._status",
               "bigmachine.backends.local", "bigmachine.backends.inprocess",
               "bigmachine.backends.ssh", "bigmachine.backends.ec2",
               "http.server", "urllib.request", "tarfile", "email", "importlib.metadata"}


def fresh_output(code: str) -> list:
    """The words code prints in a fresh interpreter (which must succeed)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def newly_imported(code: str, names: set) -> str:
    """Which of names running code imports in a fresh interpreter (a printed sorted list)."""
    check = (f"import sys; before = set(sys.modules); {code}; "
             f"print(sorted((set(sys.modules) - before) & set({sorted(names)!r})))")
    return " ".join(fresh_output(check))


@pytest.mark.parametrize("code", [
    "import bigmachine",
    # what the template imports before it forks machines (backends/_template.py _warm)
    "from bigmachine.backends._template import main; from bigmachine import _worker",
])
def test_machine_side_imports_leave_the_driver_side_out(code):
    """Every module imported here is paid at each session's first start (the
    template imports it): the driver's side is imported only where it is used."""
    assert newly_imported(code, DRIVER_SIDE) == "[]"


def test_a_local_session_imports_only_the_optional_parts_it_uses():
    """The status page (http.server), package checks (importlib.metadata, tarfile) and
    progress bars (tqdm, when stderr is a terminal) are imported by the sessions that
    use them: the others reach their first call sooner."""
    optional = {"bigmachine._statuspage", "bigmachine.backends._packages", "http.server",
                "importlib.metadata", "tarfile", "email", "tqdm"}
    code = ("import bigmachine as bm; "
            "from bigmachine.bench._echo import Echo; b = bm.start(bm.Local()); "
            "m, = b.start(1, services={'Echo': Echo()}); m.call('Echo.echo', 1); "
            "b.shutdown()")
    assert newly_imported(code, optional) == "[]"


def test_driver_side_names_import_on_first_use():
    code = ("import sys, bigmachine as bm; "
            "assert not {'bigmachine._start', 'bigmachine._driver'} & set(sys.modules); "
            "from bigmachine import SSH; assert bm.SSH is SSH; "
            "print(bm.start.__module__, bm.Local.__name__, bm.EC2.__name__, "
            "bm.InProcess.__name__, bm.Status.__name__, 'start' in dir(bm))")
    assert fresh_output(code) == ["bigmachine._start", "Local", "EC2", "InProcess", "Status",
                                  "True"]
    with pytest.raises(AttributeError):
        bm.no_such_name


def test_a_local_sessions_template_starts_before_the_driver_is_imported():
    """The template is the longest step of a session's first call: it starts first,
    and warms up while the driver imports its modules and makes its session."""
    code = ("import sys, bigmachine as bm\n"
            "from bigmachine.backends import _template\n"
            "started, seen = _template.Template.__init__, []\n"
            "def init(self, env):\n"
            "    seen.append('bigmachine._driver' in sys.modules)\n"
            "    started(self, env)\n"
            "_template.Template.__init__ = init\n"
            "bm.start().shutdown()\n"
            "print(seen)")
    assert fresh_output(code) == ["[False]"]
