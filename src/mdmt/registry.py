"""One registry convention for every extension point: datasets, backbones, heads, weightings, strategies.

A plug-in is a factory registered under a name with a typed parameter dataclass. A config entry names it as
``{name, params}`` (or just the name); the params are validated against the dataclass (unknown keys and wrong
types are errors naming the key) and the factory receives the dataclass instance.

    BACKBONES = Registry("backbone")

    @dataclass
    class TinyParams:
        width: int = 16

    @BACKBONES.register("tiny_cnn", TinyParams, "a 4-layer CNN for tests")
    def build_tiny(params: TinyParams, **context) -> Backbone: ...

    BACKBONES.build(PluginRef("tiny_cnn", {"width": 8}), weights="none")
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mdmt.config import PluginRef, from_dict
from mdmt.errors import ConfigError

T = TypeVar("T")


@dataclass
class NoParams:
    """For plug-ins that take no parameters."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered plug-in: its name, factory, parameter dataclass and one-line summary."""

    name: str
    factory: Callable[..., T]
    params: type
    summary: str

    def parse(self, values: dict[str, Any] | None, where: str) -> Any:
        """``values`` validated into this entry's parameter dataclass."""
        return from_dict(self.params, dict(values or {}), where)

    def describe_params(self) -> str:
        """``key=default, ...`` of the parameter dataclass."""
        parts = []
        for f in dataclasses.fields(self.params):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            parts.append(f"{f.name}={default!r}")
        return ", ".join(parts)


class Registry(Generic[T]):
    """Named plug-ins of one kind (``kind`` appears in error messages and in ``mdmt info``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._fallbacks: list[tuple[Callable[[str], bool], Entry[T]]] = []

    def register(
        self, name: str, params: type = NoParams, summary: str = ""
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``factory(params, **context) -> T`` under ``name``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, params, summary or (factory.__doc__ or "").strip().split("\n")[0])
            return factory

        return decorate

    def add(self, name: str, factory: Callable[..., T], params: type = NoParams, summary: str = "") -> None:
        """Register ``factory`` under ``name`` (a name registered twice is an error)."""
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is registered twice")
        if not dataclasses.is_dataclass(params):
            raise TypeError(f"{self.kind} {name!r}: params must be a dataclass, got {params!r}")
        self._entries[name] = Entry(name, factory, params, summary)

    def add_family(self, accepts: Callable[[str], bool], factory: Callable[..., T], params: type = NoParams,
                   summary: str = "") -> None:
        """Register a family of names (for example every timm model) that ``accepts`` recognises."""
        self._fallbacks.append((accepts, Entry("*", factory, params, summary)))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or any(accepts(name) for accepts, _ in self._fallbacks)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        """The names registered one by one (families not expanded)."""
        return list(self._entries)

    def get(self, name: str) -> Entry[T]:
        """The entry of ``name``; ConfigError with the closest names otherwise."""
        if name in self._entries:
            return self._entries[name]
        for accepts, entry in self._fallbacks:
            if accepts(name):
                return dataclasses.replace(entry, name=name)
        close = difflib.get_close_matches(name, self._entries, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        hint += f" (known: {', '.join(self._entries)})" if len(self._entries) <= 12 else "; `mdmt info` lists them"
        raise ConfigError(f"unknown {self.kind} {name!r}{hint}")

    def parse(self, ref: PluginRef | str, where: str | None = None) -> tuple[Entry[T], Any]:
        """The entry and validated params of a config entry."""
        ref = PluginRef.of(ref)
        entry = self.get(ref.name)
        return entry, entry.parse(ref.params, where or f"{self.kind} {ref.name!r} params")

    def build(self, ref: PluginRef | str, where: str | None = None, **context: Any) -> T:
        """Build the plug-in a config entry names: ``factory(params, **context)``."""
        entry, params = self.parse(ref, where)
        return entry.factory(params, **context)

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, summary, parameters) of every entry and family, for ``mdmt info``."""
        rows = [(e.name, e.summary, e.describe_params()) for e in self._entries.values()]
        rows += [("(family)", e.summary, e.describe_params()) for _, e in self._fallbacks]
        return rows
