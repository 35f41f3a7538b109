"""Exceptions that name the file, column or id at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message names the file, column or id."""


class ImageReadError(DataError):
    """An image file that cannot be decoded."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(ValueError):
    """A configuration value or key that is not valid."""
