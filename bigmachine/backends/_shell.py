"""Values that reach a remote shell: each word quoted, or refused.

A system's `python=` is either one word (a command name or a path, which may
start with ``~/``) or an argv list taken word for word, such as
``["prlimit", "--nofile=1024:", "python3"]``. A string that a shell would
split or interpret (spaces, ``;``, ``$(...)``, quotes) is refused, so that
what runs is never a guess.
"""
from __future__ import annotations

import re
import shlex
from typing import Sequence, Union

from ..errors import Error

_PLAIN = re.compile(r"(~/)?[A-Za-z0-9_./+=:,@%-]+")


def python_argv(python: Union[str, Sequence[str]]) -> list[str]:
    """python= as an argv list, or an Error saying how to write it."""
    if isinstance(python, str):
        if _PLAIN.fullmatch(python):
            return [python]
        words = python.split()
        hint = (f"; to run a command, pass it as an argv list, e.g. python={words!r}"
                if len(words) > 1 else "")
        raise Error(f"python={python!r} is not a plain command name or path: a shell would "
                    f"interpret some of its characters{hint}")
    words = list(python) if isinstance(python, (list, tuple)) else []
    if not words or not all(isinstance(w, str) and w and "\0" not in w for w in words):
        raise Error(f"python= must be a command name, a path or an argv list of non-empty "
                    f"strings, not {python!r}")
    return words


def join(argv: Sequence[str]) -> str:
    """argv as one shell command line, every word quoted; a leading ``~/`` stays the
    home directory."""
    return " ".join('"$HOME"/' + shlex.quote(w[2:]) if w.startswith("~/") else shlex.quote(w)
                    for w in argv)


def exports(env: dict) -> str:
    """Shell assignments for env (followed by a space), each value quoted; names must
    be plain identifiers."""
    for key, value in env.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise Error(f"env name {key!r} is not a valid environment variable name")
        if not isinstance(value, str) or "\0" in value:
            raise Error(f"env value for {key} must be a string without NUL bytes")
    return "".join(f"{key}={shlex.quote(value)} " for key, value in env.items())
