"""Training methods: one module each, registered by name with its config dataclass.

A method module holds its hyper-parameter dataclass (a ``MethodConfig`` subclass), its
class decorated with ``@register_method("name", ConfigClass)``, its training step and
what its model file holds. See ``protocol.SegmentationMethod`` for the interface.
"""

from __future__ import annotations

from protoseg.methods.protocol import (
    Batch,
    Deployment,
    SegmentationMethod,
    StepOutput,
    StudentWrapper,
    as_module,
)
from protoseg.methods.registry import (
    METHOD_CONFIGS,
    METHODS,
    create_method,
    method_config_class,
    register_method,
)


def _import_method_modules() -> None:
    """Import every module of this package, so a new method needs no line anywhere else."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("common", "protocol", "registry"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_method_modules()

__all__ = [
    "METHODS",
    "METHOD_CONFIGS",
    "Batch",
    "Deployment",
    "SegmentationMethod",
    "StepOutput",
    "StudentWrapper",
    "as_module",
    "create_method",
    "method_config_class",
    "register_method",
]
