"""The model registries: ``@register_model(name)`` adds a network class to ``MODELS``;
``@register_head(kind)`` adds the builder of an extra prediction head to ``HEADS``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

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


def _qualname(obj: Any) -> str:
    """The importable dotted name of a class or function."""
    return f"{obj.__module__}.{obj.__qualname__}"


# A head builder: (deployed network, the head's spec from a model file) -> the network
# predicting with that head. The spec is plain data: ``kind``, ``options``, ``state``.
HeadBuilder = Callable[[nn.Module, dict[str, Any]], nn.Module]
HEADS: dict[str, HeadBuilder] = {}
HeadBuilderT = TypeVar("HeadBuilderT", bound=HeadBuilder)


def register_head(kind: str) -> Callable[[HeadBuilderT], HeadBuilderT]:
    """Return a decorator that registers the builder of the head ``kind`` as ``HEADS[kind]``.

    The part that deploys a head registers its builder, so inference rebuilds any head a
    model file names by its ``kind`` without knowing the part.
    """

    def add(builder: HeadBuilderT) -> HeadBuilderT:
        old = HEADS.get(kind)
        if old is not None and _qualname(old) != _qualname(builder):
            raise ValueError(f"head kind {kind!r} is already registered to {_qualname(old)}")
        HEADS[kind] = builder
        return builder

    return add


def build_head(network: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``network`` predicting with the head ``spec`` describes (ValueError for an unknown kind)."""
    kind = spec.get("kind")
    if kind not in HEADS:
        known = ", ".join(sorted(HEADS)) or "none"
        raise ValueError(f"unknown head kind {kind!r}: registered kinds are {known}")
    return HEADS[str(kind)](network, spec)


ParamGroups = tuple[list[nn.Parameter], list[nn.Parameter]]


@runtime_checkable
class HasParamGroups(Protocol):
    """A module that declares its learning-rate groups: (backbone, decoder and heads)."""

    def param_groups(self) -> ParamGroups:
        """(backbone parameters, decoder and heads' parameters)."""
        ...


def param_groups(module: nn.Module) -> ParamGroups:
    """``module``'s declared groups, or all its parameters in the decoder group when it
    declares none (a network without a pretrained backbone part)."""
    if isinstance(module, HasParamGroups):
        backbone, decoder = module.param_groups()
        return list(backbone), list(decoder)
    return [], list(module.parameters())


def lock_backbone(module: nn.Module) -> int:
    """Freeze ``module``'s backbone group (``optim.lock_backbone``, UniMatch V2's
    ``lock_backbone``): it gets no gradient and no optimiser group. Returns how many tensors
    it froze. Done before a method copies the network into a teacher or DDP wraps it."""
    backbone, _ = param_groups(module)
    if not backbone:
        raise ValueError(
            f"optim.lock_backbone=true, but {type(module).__name__} declares no backbone "
            "parameters (param_groups()); set optim.lock_backbone=false"
        )
    for param in backbone:
        param.requires_grad_(False)
    return len(backbone)
