"""The method registries: method name -> its class, and -> its config dataclass.

They live with the methods (``protoseg.config`` imports no other layer): importing
``protoseg.methods`` registers every method and hands ``protoseg.config`` the lookup of a
``method:`` section's dataclass.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from protoseg.config import Config, ConfigError, MethodConfig, use_method_configs
from protoseg.methods.protocol import SegmentationMethod

METHODS: dict[str, type[nn.Module]] = {}
# method name -> its config dataclass; filled by register_method.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}

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


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the registered method ``name`` (ConfigError if unknown)."""
    if name not in METHOD_CONFIGS:
        close = difflib.get_close_matches(name, METHOD_CONFIGS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"method.name={name!r} is not a registered method.{hint} "
            f"Choose one of {', '.join(sorted(METHOD_CONFIGS))}"
        )
    return METHOD_CONFIGS[name]


def create_method(model: nn.Module, cfg: Config) -> SegmentationMethod:
    """Build the method ``cfg.method.name`` around a student network."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](model, cfg)  # type: ignore[return-value]


use_method_configs(method_config_class)
