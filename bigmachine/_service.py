"""Services: the @service decorator and the per-machine registry of instances."""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from .errors import Error

T = TypeVar("T", bound=type)

SYNC, ASYNC, GENERATOR, ASYNC_GENERATOR = "sync", "async", "generator", "async generator"
_MARK = "__bigmachine_service__"


def service(cls: T) -> T:
    """Mark a class as a bigmachine service.

    Its public methods become callable as ``"Name.method"`` on every machine
    the instance is installed on. Sync methods run in the machine's thread
    pool, ``async def`` methods on its event loop, and (async) generator
    methods stream their items to the caller. An optional
    ``init(self, machine)`` runs once on the machine before it is RUNNING.
    """
    if not isinstance(cls, type):
        raise Error("@bigmachine.service decorates a class")
    setattr(cls, _MARK, True)
    return cls


def method_kind(fn: Callable) -> str:
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GENERATOR
    if inspect.isgeneratorfunction(fn):
        return GENERATOR
    if inspect.iscoroutinefunction(fn):
        return ASYNC
    return SYNC


def check_services(services: dict) -> None:
    """Raise Error unless services maps names to instances of @service classes."""
    if not isinstance(services, dict) or not services:
        raise Error("services must be a non-empty dict of name -> @bigmachine.service instance")
    for name, inst in services.items():
        if not isinstance(name, str) or not name or "." in name:
            raise Error(f"service name {name!r} must be a non-empty string without dots")
        if not getattr(type(inst), _MARK, False):
            raise Error(f"service {name!r} is a {type(inst).__qualname__}, "
                        "not an instance of a @bigmachine.service class")


class Registry:
    """The services installed on one machine, and the lookup of their methods."""

    def __init__(self) -> None:
        self.services: dict[str, Any] = {}
        self._methods: dict[str, tuple[Callable, str]] = {}

    def add(self, name: str, instance: Any) -> None:
        if name in self.services:
            raise Error(f"service {name!r} is already installed")
        self.services[name] = instance

    def lookup(self, address: str) -> tuple[Callable, str]:
        """Return (bound method, kind) for "Service.method"."""
        found = self._methods.get(address)
        if found is not None:
            return found
        if not isinstance(address, str) or address.count(".") != 1:
            raise Error(f"method address {address!r} must look like 'Service.method'")
        name, method = address.split(".")
        inst = self.services.get(name)
        if inst is None:
            raise Error(f"no service {name!r} on this machine; services: "
                        f"{', '.join(sorted(self.services)) or 'none'}")
        fn = getattr(inst, method, None) if _public(method) else None
        if fn is None or not callable(fn):
            raise Error(f"service {name!r} has no method {method!r}; methods: "
                        f"{', '.join(public_methods(inst))}")
        found = self._methods[address] = (fn, method_kind(fn))
        return found


def _public(method: str) -> bool:
    return not method.startswith("_") and method != "init"


def public_methods(inst: Any) -> list[str]:
    return sorted(m for m in dir(inst) if _public(m) and callable(getattr(inst, m, None)))
