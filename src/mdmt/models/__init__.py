"""mdmt.models."""

from mdmt.models import xrv  # noqa: F401  registers the torchxrayvision backbones into BACKBONES
