"""The error protoseg.models raises for arguments or weights it cannot build a network from."""

from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be built from its arguments, or its weights cannot be loaded."""
