"""protoseg: semi-supervised semantic segmentation with prototype-based consistency (PCR)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("protoseg.config", "load_config"),
    "Config": ("protoseg.config", "Config"),
    "create_model": ("protoseg.models", "create_model"),
    "create_method": ("protoseg.methods", "create_method"),
    "PrototypeBank": ("protoseg.components.prototypes", "PrototypeBank"),
    "Trainer": ("protoseg.engine.trainer", "Trainer"),
    "load": ("protoseg.inference", "load"),
}


def __getattr__(name: str) -> Any:
    """Import the public API on first use, so that ``import protoseg`` stays cheap."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        if module == "protoseg.config":
            # A config's method section is resolved through the methods' registry.
            importlib.import_module("protoseg.methods")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'protoseg' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
