"""Code bundles: the files a remote machine needs, content-addressed.

A Bundle is a set of files (relative path -> bytes) whose hash names it, so a
host that already holds a bundle is never sent it again. Two kinds are made:
the bigmachine package itself (sources, plus the driver's compiled extensions
when the host can load them) and the user's code (the driver's working
directory and the sys.path entries that are not part of an installation).
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib
import io
import os
import site
import sys
import sysconfig
import tarfile
from typing import Sequence

from .._compiled import compiled_modules
from ..errors import Error

MAX_BUNDLE_FILES = 20000
MAX_BUNDLE_BYTES = 128 << 20
DEFAULT_EXCLUDE = ("build", "dist", "*.egg-info", "node_modules", "__pycache__")


class Bundle:
    """Files to ship as one content-addressed unit: relpath -> bytes."""

    def __init__(self, label: str, files: dict[str, bytes], salt: str = ""):
        self.label = label
        self.files = files
        self.salt = salt
        digest = hashlib.sha256(salt.encode() + b"\0")
        for rel in sorted(files):
            digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        self.hash = digest.hexdigest()
        self.size = sum(len(data) for data in files.values())

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
            for rel in sorted(self.files):
                data = self.files[rel]
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.mode = 0o600  # private on the host (an extension loads without x bits)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def package_dir() -> str:
    import bigmachine

    return os.path.dirname(os.path.abspath(bigmachine.__file__))


def bigmachine_bundle(ext_suffix: str, binaries: bool) -> tuple[Bundle, list[str]]:
    """The bigmachine package's sources, with our built extensions when binaries.

    Returns the bundle and the extension module names: the .pyx modules, and
    the .py modules with a .pxd beside them (see setup.py).
    """
    pkg = package_dir()
    files: dict[str, bytes] = {}
    exts = compiled_modules()
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith((".py", ".pyx", ".pxd", ".pyi")) or fn == "py.typed":
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, os.path.dirname(pkg)).replace(os.sep, "/")
                with open(path, "rb") as f:
                    files[rel] = f.read()
    if binaries:
        for name in exts:
            try:
                path = importlib.import_module(name).__file__ or ""
            except ImportError as exc:
                raise Error(f"cannot ship {name}: the driver has no built module ({exc}); "
                            "build it (pip install -e .) or pass SSH(build='always')") from exc
            if not path.endswith(sysconfig.get_config_var("EXT_SUFFIX") or ".so"):
                raise Error(f"cannot ship {name}: it was loaded from {path}, not a compiled module")
            with open(path, "rb") as f:
                files[name.replace(".", "/") + ext_suffix] = f.read()
    salt = f"bigmachine|{'bin' if binaries else 'src'}|{ext_suffix}"
    return Bundle("bigmachine", files, salt), exts


def _site_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - old virtualenv's site module
        pass
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        dirs.add(user)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    return sorted(os.path.realpath(d) for d in dirs if d)


def _is_installed(path: str, site_dirs: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in site_dirs)


def user_paths() -> list[str]:
    """The driver's working directory and its sys.path entries that hold user code."""
    site_dirs = _site_dirs()
    cwd = os.getcwd()
    out: list[str] = []
    for entry in [cwd] + list(sys.path):
        path = os.path.abspath(entry or cwd)
        if path in out or not os.path.isdir(path) or _is_installed(path, site_dirs):
            continue
        out.append(path)
    return out


def _excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def user_bundle(root: str, include: Sequence[str], exclude: Sequence[str]) -> Bundle:
    """The files under root that match include and not exclude, as one bundle.

    Hidden dirs, venvs, site-packages, cache dirs (CACHEDIR.TAG, as our bundle
    caches are) and the bigmachine package itself are never walked.
    """
    pkg = package_dir()
    files: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if (d.startswith(".") or os.path.realpath(full) == pkg
                    or os.path.exists(os.path.join(full, "pyvenv.cfg"))
                    or os.path.exists(os.path.join(full, "CACHEDIR.TAG"))
                    or d in ("site-packages", "dist-packages")
                    or _excluded(rel, d, exclude) or os.path.islink(full)):
                continue
            keep.append(d)
        dirnames[:] = keep
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(fn, p) or fnmatch.fnmatch(rel, p) for p in include):
                continue
            if _excluded(rel, fn, exclude) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # unreadable (a socket, a permission): not code we can ship
            files[rel] = data
            total += len(data)
            if len(files) > MAX_BUNDLE_FILES or total > MAX_BUNDLE_BYTES:
                raise Error(
                    f"the user code under {root} is too large to ship "
                    f"(> {MAX_BUNDLE_FILES} files or {MAX_BUNDLE_BYTES >> 20} MiB); "
                    "narrow it with SSH(user_paths=..., include=..., exclude=...)")
    return Bundle(root, files, "user")
