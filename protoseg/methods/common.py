"""The plumbing every method shares: the student and its wrapper, the supervised loss, and
no-op defaults of the protocol. It holds no training step: each method writes its own."""

from __future__ import annotations

from torch import Tensor, nn

from protoseg.components import EMATeacher, InitContext, SupervisedObjective
from protoseg.config import Config, MethodConfig
from protoseg.methods.protocol import Batch, Deployment, StepOutput


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of a warm-up stated in epochs of the epoch set."""
    return int(round(warmup_epochs * steps_per_epoch))


def split_outputs(out: dict[str, Tensor], n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Outputs of a concatenated [labelled; unlabelled] batch, split at row ``n``."""
    return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}


class MethodBase(nn.Module):
    """Protocol defaults: a student trained on labelled images, deployed as it is."""

    uses_unlabeled = False
    heads: tuple[str, ...] = ("linear",)
    find_unused_parameters = False

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.config: MethodConfig = cfg.method
        self.student = model
        self.num_classes, self.ignore_index = cfg.data.num_classes, cfg.data.ignore_index
        t = cfg.train
        self.supervised_loss = SupervisedObjective(
            t.loss, cfg.data.ignore_index, t.ohem_threshold, t.ohem_min_kept, t.aux_weight
        )
        self.warmup_steps = 0
        # The module the student runs through (DDP or compiled); a list keeps it out of
        # the state dict, so checkpoints hold the plain network.
        self._forward: list[nn.Module] = [model]

    def setup(self, steps_per_epoch: int) -> None:
        """Derive the warm-up length from the method's ``warmup_epochs``, if it has one, and
        tell every EMA teacher of the method the epoch length (its EMA start may need it)."""
        epochs = getattr(self.config, "warmup_epochs", 0.0)
        self.warmup_steps = warmup_steps(epochs, steps_per_epoch)
        for module in self.modules():
            if isinstance(module, EMATeacher):
                module.setup(steps_per_epoch)

    def set_student_forward(self, module: nn.Module) -> None:
        """Run the student through ``module`` (a DDP/compiled wrapper of ``student``)."""
        self._forward = [module]

    def run_student(self, images: Tensor) -> dict[str, Tensor]:
        """Forward the student (through its wrapper, if any)."""
        return self._forward[0](images)

    def in_warmup(self, step: int) -> bool:
        """True while only the supervised loss trains the student."""
        return step < self.warmup_steps

    def supervised_step(self, labeled: Batch) -> StepOutput:
        """The supervised loss of the student on a labelled batch (also the warm-up's step)."""
        loss, logs = self.supervised_loss(self.run_student(labeled["image"]), labeled["mask"])
        return {"loss": loss, **logs}

    def after_optimizer_step(self, step: int) -> None:
        """Nothing follows the student by default."""

    def needs_init(self, step: int) -> bool:
        """No one-time set-up by default."""
        return False

    def initialize(self, context: InitContext) -> None:
        """No one-time set-up by default."""

    def deployed_network(self) -> nn.Module:
        """The network a model file holds (the student; teacher methods return the teacher)."""
        return self.student

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The deployed network with its linear head."""
        self.check_head(head)
        return self.deployed_network()

    def deploy(self) -> Deployment:
        """The deployed network, with no head beyond its own classifier."""
        return {"network": self.deployed_network(), "heads": {}}

    def check_head(self, head: str) -> None:
        """ValueError naming the method's heads when ``head`` is not one of them."""
        if head not in self.heads:
            raise ValueError(
                f"method {self.config.name!r} has no {head!r} head; its heads: "
                f"{', '.join(self.heads)}"
            )
