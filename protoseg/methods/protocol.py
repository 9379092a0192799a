"""The method protocol: all that the engine, checkpoints, predict and export may use of a method.

A method is an ``nn.Module`` (its state dict is its checkpoint state: student, teacher,
banks; ``as_module`` gives the module view) that also provides the eleven members below.
Nothing outside ``protoseg.methods`` names a method or reaches past this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypedDict, runtime_checkable

from torch import nn

from protoseg.lifecycle import ContextFactory

Batch = dict[str, Any]
# {"loss": scalar tensor to back-propagate, <term>: tensor or float, ...}; every entry
# but "loss" is logged.
StepOutput = dict[str, Any]
# (student, find_unused_parameters) -> the module the student runs through (DDP, compiled).
StudentWrapper = Callable[[nn.Module, bool], nn.Module]


class Deployment(TypedDict):
    """What a model file holds beyond its config: the deployed network and extra heads.

    ``heads`` maps a head name to plain data (``kind``, ``options``, ``state``) from which
    ``protoseg.inference`` rebuilds it around the network; the linear head is the
    network's own classifier and needs no entry.
    """

    network: nn.Module
    heads: dict[str, dict[str, Any]]


@runtime_checkable
class SegmentationMethod(Protocol):
    """The narrow interface of a training method (see docs/adding-a-method.md)."""

    #: What the optimiser trains and DDP wraps: the network, or a module holding it and other
    #: trained parts (a head, a second network); its ``param_groups()`` gives the lr groups.
    student: nn.Module
    #: Whether training_step needs a batch of unlabelled images (one weak view each; a
    #: method that wants several strong views draws them itself from that batch).
    uses_unlabeled: bool
    #: Prediction heads, the primary one first (it decides the best model).
    heads: tuple[str, ...]
    #: Steps of supervised-only warm-up (0 for none); known after ``setup``.
    warmup_steps: int

    def setup(self, steps_per_epoch: int) -> None:
        """Derive step counts (e.g. the warm-up length) from the schedule."""
        ...

    def wrap_student(self, wrap: StudentWrapper) -> nn.Module:
        """Run the student through ``wrap(student, find_unused_parameters)`` from now on
        (a DDP or compiled wrapper); returns the wrapper."""
        ...

    def before_step(self, step: int, context: ContextFactory) -> None:
        """Called before each training step; a method that needs a one-time set-up (e.g. a
        prototype bank's k-means when the warm-up ends) calls ``context()`` and does it."""
        ...

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """The loss of one (micro-)batch and its logged terms."""
        ...

    def after_optimizer_step(self, step: int) -> None:
        """Called once after each optimiser update (EMA teachers and banks move here)."""
        ...

    def inference_model(self, head: str) -> nn.Module:
        """The network that predicts with ``head``: returns ``{"logits": (B, C, H, W)}``."""
        ...

    def deploy(self) -> Deployment:
        """What a model file of this method holds."""
        ...


def as_module(method: SegmentationMethod) -> nn.Module:
    """The method as the ``nn.Module`` it is (state dict, ``to``, ``train``, sub-modules)."""
    if not isinstance(method, nn.Module):
        raise TypeError(f"{type(method).__name__} is no nn.Module: a method must subclass one")
    return method
