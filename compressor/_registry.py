"""A small typed name -> object registry (methods, transforms): duplicates are errors, unknown names get hints."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one ``kind`` (e.g. "pruning method") mapped to objects, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item``; a second item under the same name is a programming error (ValueError)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``; unknown names raise UnknownNameError listing close matches."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
