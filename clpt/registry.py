"""A name -> object registry, timm style: register with a decorator, look up by name.

An unknown name is a `ValueError` (a `ConfigError` where it comes from a config)
that lists the valid names, so a typo never falls through to a default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """`registry.register(name, obj)`, or `@registry.register(name)` as a decorator."""

        def add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()


def by_name(module: str, attr: str):
    """`module.attr`, imported now: what a registry entry names lazily (its code is not imported before)."""
    import importlib

    return getattr(importlib.import_module(module), attr)


def lazy(module: str, attr: str) -> Callable:
    """A callable that imports `module.attr` on first call (keeps registries free of heavy imports)."""

    def call(*args, **kwargs):
        return by_name(module, attr)(*args, **kwargs)

    call.__qualname__ = f"{module}.{attr}"
    return call
