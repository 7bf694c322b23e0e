"""Which of bigmachine's modules the build compiles, and which of them run as Python.

The build (setup.py) compiles the .pyx modules and the .py modules with a .pxd
beside them (the connection core). A compiled .py module also imports from its
source when its extension is missing (a checkout not built, a host that could
not build): correct, but slower; ``bigmachine version`` and every benchmark's
header say so.
"""
from __future__ import annotations

import glob
import importlib
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def compiled_modules() -> list[str]:
    """The modules the build compiles, by full name."""
    names = [path[:-4] for path in glob.glob(os.path.join(_PACKAGE, "*.pyx"))]
    names += [path[:-4] for path in glob.glob(os.path.join(_PACKAGE, "*.pxd"))
              if os.path.exists(path[:-4] + ".py")]
    return sorted("bigmachine." + os.path.basename(name) for name in names)


def running_as_python() -> list[str]:
    """The modules the build compiles that this process imported from Python source."""
    return [name for name in compiled_modules()
            if (importlib.import_module(name).__file__ or "").endswith(".py")]


def describe() -> str:
    """One line: whether everything the build compiles runs compiled here."""
    plain = running_as_python()
    if not plain:
        return f"all {len(compiled_modules())} compiled modules in use"
    return f"running as Python, not compiled: {', '.join(plain)} (slower; build with pip install -e .)"
