"""The model registry: ``@register_model(name)`` adds a network class to ``MODELS``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelT = TypeVar("ModelT", bound=type[nn.Module])

MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Return a class decorator that registers a segmentation network as ``MODELS[name]``."""

    def add(cls: ModelT) -> ModelT:
        old = MODELS.get(name)
        # Compare by qualified name, not identity, so re-importing a module stays harmless.
        if old is not None and _qualname(old) != _qualname(cls):
            raise ValueError(f"model name {name!r} is already registered to {_qualname(old)}")
        MODELS[name] = cls
        return cls

    return add


def _qualname(cls: type) -> str:
    """The importable dotted name of ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"
