"""Name -> constructor registries, so configs pick components by name instead of if/elif chains."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of constructors for one kind of component (backbone, head, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._canonical: list[str] = []

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a constructor under one or more names (first is canonical)."""

        def decorate(constructor: Callable[..., T]) -> Callable[..., T]:
            self._canonical.append(names[0].lower())
            for name in names:
                key = name.lower()
                if key in self._entries:
                    raise ValueError(f"{self.kind} {name!r} is already registered")
                self._entries[key] = constructor
            return constructor

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            known = ", ".join(self.names(aliases=True))
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self, aliases: bool = False) -> list[str]:
        """Registered names: canonical ones only, or with their aliases."""
        return sorted(self._entries) if aliases else sorted(self._canonical)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._entries
