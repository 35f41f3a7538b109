"""The optional ``infer`` extra (grad-cam, onnx, onnxruntime), imported only when a command needs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from mdmt.errors import ConfigError

EXTRA_HINT = "install the infer extra: pip install 'mdmt[infer]' (grad-cam, onnx, onnxruntime)"


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or a ConfigError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{purpose} needs the {module.split('.')[0]} package ({exc}); {EXTRA_HINT}") from None
