"""The method protocol: all that the engine, checkpoints, predict and export may use of a method.

A method is an ``nn.Module`` (its state dict is its checkpoint state: student, teacher,
banks) that also provides the members below. Nothing outside ``protoseg.methods`` names a
method or reaches past this protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable

from torch import Tensor, nn

from protoseg.components.prototype_branch import InitContext
from protoseg.config import MethodConfig

Batch = dict[str, Any]
# {"loss": scalar tensor to back-propagate, <term>: tensor or float, ...}; every entry
# but "loss" is logged.
StepOutput = dict[str, Any]


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
    """The narrow interface of a training method (see the README's "add a method")."""

    #: The method's hyper-parameters (its registered MethodConfig subclass).
    config: MethodConfig
    #: What the optimiser trains and DDP wraps: the network, or a module holding it and other
    #: trained parts (a head, a second network); its ``param_groups()`` gives the lr groups.
    student: nn.Module
    #: Whether training_step needs a batch of unlabelled images (one weak view each; a
    #: method that wants several strong views draws them itself from that batch).
    uses_unlabeled: bool
    #: Prediction heads, the primary one first (it decides the best model).
    heads: tuple[str, ...]
    #: Whether some student parameters get no gradient (DDP must be told).
    find_unused_parameters: bool
    #: Steps of supervised-only warm-up (0 for none); known after ``setup``.
    warmup_steps: int

    def setup(self, steps_per_epoch: int) -> None:
        """Derive step counts (e.g. the warm-up length) from the schedule."""
        ...

    def set_student_forward(self, module: nn.Module) -> None:
        """Run the student through ``module`` (a DDP or compiled wrapper of ``student``)."""
        ...

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """The loss of one (micro-)batch and its logged terms."""
        ...

    def after_optimizer_step(self, step: int) -> None:
        """Called once after each optimiser update (EMA teachers and banks move here)."""
        ...

    def needs_init(self, step: int) -> bool:
        """Whether ``initialize`` must run before training step ``step``."""
        ...

    def initialize(self, context: InitContext) -> None:
        """One-time set-up when the warm-up ends (e.g. a prototype bank's k-means)."""
        ...

    def inference_model(self, head: str) -> nn.Module:
        """The network that predicts with ``head``: returns ``{"logits": (B, C, H, W)}``."""
        ...

    def deploy(self) -> Deployment:
        """What a model file of this method holds."""
        ...

    # nn.Module members the engine uses (a method is an nn.Module).
    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor a resume needs (student, teacher, banks)."""
        ...

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> Any:
        """Restore what ``state_dict`` returned."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Training mode for the student (a teacher keeps its own mode)."""
        ...

    def to(self, device: Any) -> Any:
        """Move every network and buffer to ``device``."""
        ...

    def named_modules(self) -> Any:
        """Sub-modules by name (where the deployed network sits in the state dict)."""
        ...
