"""Named registries: where a name given by a user selects behaviour (a scene, a backbone, an importer…).

One class so every registry refuses the same way: an empty or taken name when registering, and
an unknown name with the list of valid ones when looking up.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from semla.schemas.errors import InvalidInputError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A ``dict`` of name → value, for one ``kind`` of thing ("scene", "backbone", ...)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name``; returns it.

        Raises:
            InvalidInputError: the name is empty, not a string, or already registered.
        """
        if not name or not isinstance(name, str):
            raise InvalidInputError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self:
            raise InvalidInputError(f"{self.kind} {name!r} is already registered")
        self[name] = value
        return value

    def lookup(self, name: str) -> T:
        """The value registered under ``name``.

        Raises:
            UnknownNameError: unknown; the message lists the valid names.
        """
        try:
            return self[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names()) or '(none)'}") \
                from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)
