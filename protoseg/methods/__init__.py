"""Training methods: one module each, registered by name with its config dataclass.

A method module holds its hyper-parameter dataclass (a ``MethodConfig`` subclass), its
class decorated with ``@register_method("name", ConfigClass)``, its training step and
what its model file holds. See ``protocol.SegmentationMethod`` for the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from protoseg.config import METHOD_CONFIGS, Config, MethodConfig
from protoseg.methods.protocol import Batch, Deployment, SegmentationMethod, StepOutput

METHODS: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound=type[nn.Module])


def register_method(name: str, config_class: type[MethodConfig]) -> Callable[[_M], _M]:
    """Class decorator: register a method and the dataclass its ``method:`` section uses.

    One class may be registered under several names with different config dataclasses
    (e.g. ``fixmatch`` and ``fixmatch+pcr``, whose config adds a ``prototypes`` block).
    """

    def add(cls: _M) -> _M:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        METHOD_CONFIGS[name] = config_class
        return cls

    return add


def create_method(model: nn.Module, cfg: Config) -> SegmentationMethod:
    """Build the method ``cfg.method.name`` around a student network."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](model, cfg)  # type: ignore[return-value]


def _import_method_modules() -> None:
    """Import every module of this package, so a new method needs no line anywhere else."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("common", "protocol"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_method_modules()

__all__ = [
    "METHODS",
    "Batch",
    "Deployment",
    "SegmentationMethod",
    "StepOutput",
    "create_method",
    "register_method",
]
