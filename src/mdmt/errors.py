"""Exceptions that name the file, column or id at fault."""

from __future__ import annotations

import re
from pathlib import Path

UNSAFE_LOAD_ADVICE = ("weights_only", "safe_globals", "can still be loaded", "trust")
"""Words of PyTorch's advice on loading a refused file anyway; ``load_refusal`` drops every sentence holding one."""


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


def load_refusal(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line: the weights-only unpickler's own
    reason (``Unsupported global: GLOBAL os.system ...``) or the message's first line, without PyTorch's advice to
    load the file unsafely or to allow-list what it holds (a refusal for safety never suggests the unsafe path)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = found.group(1) if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    kept = [s for s in re.split(r"(?<=\.)\s+", line.strip()) if not any(word in s for word in UNSAFE_LOAD_ADVICE)]
    return " ".join(kept) or type(exc).__name__
