"""Packages for machines: a system's packages=, requirements= and pip_options=.

Hosts may have no internet, so the driver resolves everything: for a host's
platform and Python (from its probe) it runs ``pip download
--only-binary=:all: --platform ... --python-version ...`` and ships the
wheels as one content-hashed bundle, with the driver's own pip as another.
The host installs them with that pip into a cached venv keyed by both
(remote/cache.py, op "env"), which reaches the host's own site-packages
after its own, so a package the host has is reused unless a version is
pinned. ``packages="driver"`` pins what the user's code imports to the
driver's versions. Local machines share the driver's environment: there the
packages are only checked.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from typing import Optional, Sequence, Union

from ..errors import Error
from ._bundle import Bundle

PackagesArg = Union[None, str, Sequence[str]]


class Packages:
    """What to install on machines; empty when nothing was asked."""

    def __init__(self, packages: PackagesArg = None, requirements: Optional[str] = None,
                 pip_options: Optional[Sequence[str]] = None):
        if isinstance(packages, str) and packages != "driver":
            raise Error(f"packages must be a list of requirements or wheel paths, or "
                        f"\"driver\", not {packages!r}")
        if packages is not None and not isinstance(packages, str) and not all(
                isinstance(p, str) and p for p in packages):
            raise Error(f"packages must be requirement strings or wheel paths, not {packages!r}")
        if requirements is not None and not os.path.isfile(requirements):
            raise Error(f"requirements={requirements!r}: no such file")
        if pip_options is not None and (isinstance(pip_options, str) or not all(
                isinstance(o, str) for o in pip_options)):
            raise Error(f"pip_options must be a list of strings, not {pip_options!r}")
        self.driver = packages == "driver"
        self.items = [] if packages is None or self.driver else list(packages)
        self.requirements = os.path.abspath(requirements) if requirements else None
        self.pip_options = list(pip_options or ())
        self._lock = threading.Lock()
        self._resolved: dict[tuple, tuple[Bundle, list[str]]] = {}

    def __bool__(self) -> bool:
        return bool(self.items or self.requirements or self.driver)

    def resolve(self, probe: dict, label: str, user: Sequence[Bundle]) -> tuple[Bundle, list[str]]:
        """The wheels for the probed host, and the arguments of its pip install."""
        tags = platform_tags(probe, label)
        abi = "cp" + "".join(map(str, probe["version"][:2]))
        key = (tuple(tags), abi)
        with self._lock:
            if key not in self._resolved:
                self._resolved[key] = self._download(tags, abi, probe, label, user)
            return self._resolved[key]

    def _download(self, tags: list[str], abi: str, probe: dict, label: str,
                  user: Sequence[Bundle]) -> tuple[Bundle, list[str]]:
        items = driver_requirements(user) if self.driver else self.items
        args = [f"./{os.path.basename(p)}" if p.endswith(".whl") else p for p in items]
        extra = []
        if self.requirements:
            args += ["-r", "requirements.txt"]
            extra = ["-r", self.requirements]
        with tempfile.TemporaryDirectory(prefix="bigmachine-wheels-") as dest:
            argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", dest,
                    "--python-version", ".".join(map(str, probe["version"][:2])),
                    "--implementation", "cp", "--abi", abi, "--disable-pip-version-check",
                    "--no-input", *[w for t in tags for w in ("--platform", t)],
                    *self.pip_options, *items, *extra]
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            text = done.stdout.decode("utf-8", "replace").strip()
            if done.returncode != 0:
                missing = re.findall(r"No matching distribution found for (\S+)", text)
                what = f"no wheel of {', '.join(missing)}" if missing else "pip download failed"
                raise Error(f"cannot ship packages to {label}: {what} for {tags[0]}, Python "
                            f"{'.'.join(map(str, probe['version'][:2]))} ({abi}); pip said:\n"
                            + "\n".join(f"  {line}" for line in text.splitlines()[-15:]))
            files = {}
            for name in sorted(os.listdir(dest)):
                with open(os.path.join(dest, name), "rb") as f:
                    files[name] = f.read()
        if self.requirements:
            files["requirements.txt"] = shipped_requirements(self.requirements)
        return Bundle("packages", files, "wheels"), args

    def check_local(self) -> None:
        """Local machines share the driver's environment: every package must be there."""
        if self.driver:
            return
        missing = [item for item in self.items + read_requirements(self.requirements)
                   if not installed(item)]
        if missing:
            raise Error(f"Local machines share the driver's environment, which lacks "
                        f"{', '.join(missing)}; install {'them' if len(missing) > 1 else 'it'} "
                        f"(pip install {' '.join(missing)})")


def env_key(wheels: Bundle, pip: Bundle, args: Sequence[str], probe: dict) -> str:
    """The name of the host's venv for these wheels, pip and install arguments."""
    data = json.dumps([wheels.hash, pip.hash, list(args), probe["executable"]])
    return hashlib.sha256(data.encode()).hexdigest()


_pip: list[Bundle] = []


def pip_bundle() -> Bundle:
    """The driver's own pip, to install the wheels on hosts that have none."""
    if not _pip:
        spec = importlib.util.find_spec("pip")
        if spec is None or not spec.submodule_search_locations:
            raise Error("shipping packages needs pip in the driver's environment")
        root = list(spec.submodule_search_locations)[0]
        files = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(root)).replace(os.sep, "/")
                with open(path, "rb") as f:
                    files[rel] = f.read()
        _pip.append(Bundle("pip", files, "pip"))
    return _pip[0]


def platform_tags(probe: dict, label: str) -> list[str]:
    """The wheel platform tags a Linux host accepts, most specific first."""
    arch = probe["machine"]
    libc, version = (probe.get("libc") or ["", ""])[:2]
    if probe["system"] != "Linux" or probe.get("implementation", "cpython") != "cpython":
        raise Error(f"{label}: shipping packages needs CPython on Linux, not "
                    f"{probe.get('implementation')} on {probe['system']}")
    tags = []
    if libc == "glibc" and re.fullmatch(r"2\.\d+", version or ""):
        minor = int(version.split(".")[1])
        tags += [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
        legacy = [(17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1")]
        tags += [f"{name}_{arch}" for m, name in legacy if minor >= m]
    return tags + [f"linux_{arch}"]


def driver_requirements(user: Sequence[Bundle]) -> list[str]:
    """The driver's distributions that the user's code imports, pinned to its versions."""
    imported, own = set(), set()
    for bundle in user:
        for rel, data in bundle.files.items():
            own.add(rel.split("/")[0].removesuffix(".py"))
            if rel.endswith(".py"):
                imported |= top_level_imports(data)
    skip = own | set(getattr(sys, "stdlib_module_names", ())) | {"bigmachine"}
    dists = importlib.metadata.packages_distributions()
    names = {dist for module in imported - skip for dist in dists.get(module, ())}
    return sorted(f"{name}=={importlib.metadata.version(name)}" for name in names
                  if name.lower() != "bigmachine")


def top_level_imports(source: bytes) -> set[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def read_requirements(path: Optional[str]) -> list[str]:
    """The requirement lines of a requirements file (no options, no comments)."""
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("-")]


def installed(item: str) -> bool:
    """Whether the driver's environment satisfies a requirement string or has a wheel's
    distribution at the wheel's version."""
    if item.endswith(".whl"):
        name, version = os.path.basename(item).split("-")[:2]
        try:
            return importlib.metadata.version(name) == version
        except importlib.metadata.PackageNotFoundError:
            return False
    # Imported here: only a driver checks requirements, and machines (which import
    # this package too) may run where packaging is not installed.
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(item)
    except InvalidRequirement as exc:
        raise Error(f"packages: {item!r} is not a requirement: {exc}") from None
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def shipped_requirements(path: str) -> bytes:
    """The requirements file as the host must read it: a line naming a wheel file
    names it as shipped (beside the file), as packages= wheels are."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            words = line.split()
            first = words[0] if words else ""
            if first.endswith(".whl") and "://" not in first and not first.startswith("-"):
                line = line.replace(first, f"./{os.path.basename(first)}", 1)
            out.append(line)
    return ("\n".join(out) + "\n").encode()
