"""Loading user plug-ins: modules or ``.py`` files that register datasets, backbones, heads, weightings or
strategies when imported (``plugins:`` in the config)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

from mdmt.errors import ConfigError


def load_plugins(entries: Iterable[str]) -> None:
    """Import each entry once: a dotted module name, or a path to a ``.py`` file."""
    for entry in entries:
        if entry.endswith(".py"):
            path = Path(entry).expanduser().resolve()
            name = f"mdmt_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise ConfigError(f"plugins: file not found: {path}")
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[name]
                raise
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as exc:
                raise ConfigError(f"plugins: cannot import {entry!r}: {exc}") from exc
