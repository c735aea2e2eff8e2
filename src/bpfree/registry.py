"""One registry shape for algorithms, model families and datasets.

Each kind keeps a :class:`Registry`: entries are added once by name (a second registration of the
same name is refused, so one plugin can never silently replace another), looked up with an error
that lists the choices, and listed for ``bpfree list`` and the CLI help.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from bpfree.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError, ValueError):
    """A name no entry of the registry carries.

    A ConfigError, so the CLI prints one line and exits with status 2; also a KeyError (a failed
    lookup) and a ValueError (so a pydantic field validator reports it as that field's error).
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A second registration under a name already taken (a programming error, not user input)."""


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in messages: 'algorithm', 'dataset', ...)."""

    def __init__(self, kind: str, plugin_group: str | None = None) -> None:
        self.kind = kind
        self.plugin_group = plugin_group  # entry-point group of other packages' entries, loaded at first lookup
        self._entries: dict[str, T] = {}

    def _with_plugins(self) -> dict[str, T]:
        if self.plugin_group is not None:
            from bpfree.plugins import load_plugins

            load_plugins(self.plugin_group)  # once per process; a no-op afterwards
        return self._entries

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name or not name.isprintable() or name != name.strip():
            raise ValueError(f"{self.kind} name {name!r}: expected a non-empty printable name without surrounding spaces")
        if name in self._entries:
            existing = self._entries[name]
            if existing is entry:  # the same object registered again (e.g. a module reloaded): harmless
                return entry
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered ({_describe(existing)}); choose another name")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form: ``@registry.register("name")``."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._with_plugins()[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        shown = repr(name) if isinstance(name, str) and name.isprintable() else ascii(name)
        return f"unknown {self.kind} {shown}; choose one of {', '.join(self.names()) or '(none registered)'}"

    def names(self) -> list[str]:
        return sorted(self._with_plugins())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._with_plugins().items())

    def __contains__(self, name: object) -> bool:
        return name in self._with_plugins()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._with_plugins())


def _describe(entry: object) -> str:
    module = getattr(entry, "__module__", None)
    qualname = getattr(entry, "__qualname__", None) or type(entry).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)
