"""Loading user plug-ins: modules or ``.py`` files that register datasets, backbones, heads, weightings or
strategies when imported (``plugins:`` in the config)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
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
            except Exception as exc:  # any error in the user's file: one line naming it
                del sys.modules[name]
                reason = str(getattr(exc, "msg", None) or exc).strip().splitlines()
                raise ConfigError(f"plugins: {path}{_line_in(exc, path)}: {type(exc).__name__}: "
                                  f"{reason[0] if reason else ''}") from exc
        else:
            try:
                importlib.import_module(entry)
            except ModuleNotFoundError as exc:
                raise ConfigError(f"plugins: cannot import {entry!r}: {exc}") from exc
            except Exception as exc:  # an error in the plug-in module: one line naming it
                raise ConfigError(f"plugins: importing {entry!r} failed: {type(exc).__name__}: {exc}") from exc


def _line_in(exc: BaseException, path: Path) -> str:
    """`` line N``: where ``exc`` arose in the file ``path`` (its syntax error, or the deepest frame in it)."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f" line {exc.lineno}"
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
    return f" line {lines[-1]}" if lines else ""
