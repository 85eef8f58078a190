"""Explicit name -> object registries. Nothing is discovered from file names."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from poise.errors import ConfigError, closest

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-mostly dictionary whose failed look-ups name the closest valid key."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None, check: Callable[[str, T], None] | None = None):
        self.kind = kind
        #: called with (name, value) before an entry is added; raises to refuse it
        self.check = check
        self._entries: dict[str, T] = {}
        for name, value in (entries or {}).items():
            self.register(name, value)

    def register(self, name: str, value: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if self.check is not None:
            self.check(name, value)
        self._entries[name] = value
        return value

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'{closest(name, self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
