"""The plumbing every method shares: the student and its wrapper, the supervised loss, an
optional EMA teacher and an optional prototype branch (PCR as a plug-in: any method whose
config has a ``prototypes`` block gets one), and the protocol's defaults. It holds no
training step: each method writes its own."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from protoseg.components import (
    PROTOTYPE_HEAD,
    EMATeacher,
    InitContext,
    PrototypeBranch,
    SupervisedObjective,
)
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
        self.supervised_loss = SupervisedObjective.from_train_config(cfg.train, self.ignore_index)
        self.warmup_steps = 0
        # The module the student runs through (DDP or compiled); a list keeps it out of
        # the state dict, so checkpoints hold the plain network.
        self._forward: list[nn.Module] = [model]
        self.branch: PrototypeBranch | None = None
        block = getattr(self.config, "prototypes", None)
        if block is not None:
            feature_dim: int = model.feature_dim  # type: ignore[assignment]
            self.branch = PrototypeBranch(block, self.num_classes, feature_dim, self.ignore_index)
            self.heads = (*self.heads, PROTOTYPE_HEAD)

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

    def run_student(self, images: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        """Forward the student (through its wrapper, if any), with the network's options."""
        # Options go through the wrapper's forward, never a side method: DDP only
        # synchronises gradients of what its forward ran.
        return self._forward[0](images, **kwargs)

    def in_warmup(self, step: int) -> bool:
        """True while only the supervised loss trains the student."""
        return step < self.warmup_steps

    def supervised_step(self, labeled: Batch) -> StepOutput:
        """The supervised loss of the student on a labelled batch (also the warm-up's step)."""
        loss, logs = self.supervised_loss(self.run_student(labeled["image"]), labeled["mask"])
        return {"loss": loss, **logs}

    def prototype_losses(
        self,
        out_l: dict[str, Tensor],
        out_u: dict[str, Tensor],
        y_l: Tensor,
        labels_u: Tensor,
        keep_u: Tensor,
        valid_u: Tensor,
        unsup_weight: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The prototype branch's losses and bank update (zero without a branch).

        ``out_u`` is the student's output on the unlabelled view that feeds the branch and
        ``labels_u``/``keep_u`` its pseudo-labels and their confident pixels.
        """
        if self.branch is None:
            return y_l.new_zeros((), dtype=torch.float32), {}
        pseudo = torch.where(keep_u, labels_u, torch.full_like(labels_u, self.ignore_index))
        return self.branch.losses(
            out_l["features"], out_u["features"], y_l, pseudo, valid_u, unsup_weight
        )

    def after_optimizer_step(self, step: int) -> None:
        """The bank applies its pending update; the teacher follows the student (a copy of it
        during the warm-up)."""
        if self.branch is not None:
            self.branch.after_optimizer_step()
        teacher = self.ema_teacher()
        if teacher is not None:
            teacher.follow(self.student, self.teacher_steps(step))

    def teacher_steps(self, step: int) -> int:
        """The EMA teacher's step count after ``step``: steps since the warm-up ended, or a
        negative count while it still copies the student."""
        return step - self.warmup_steps

    def needs_init(self, step: int) -> bool:
        """A prototype bank needs its k-means initialisation once the warm-up is over."""
        return self.branch is not None and step >= self.warmup_steps and not self.branch.initialized

    def initialize(self, context: InitContext) -> None:
        """Algorithm 2 on the student's features of the labelled set."""
        if self.branch is not None:
            self.branch.initialize(self.student, context)

    def ema_teacher(self) -> EMATeacher | None:
        """The method's EMA teacher (a ``teacher`` attribute), if it has one."""
        teacher = getattr(self, "teacher", None)
        return teacher if isinstance(teacher, EMATeacher) else None

    def deployed_network(self) -> nn.Module:
        """The network a model file holds: the EMA teacher if there is one, else the student."""
        teacher = self.ema_teacher()
        return teacher.network if teacher is not None else self.student

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The deployed network with its linear head, or with the prototype bank."""
        self.check_head(head)
        network = self.deployed_network()
        if head == PROTOTYPE_HEAD and self.branch is not None:
            return self.branch.head(network)
        return network

    def deploy(self) -> Deployment:
        """The deployed network, and the prototype head's bank if there is a branch."""
        heads = {PROTOTYPE_HEAD: self.branch.deploy_spec()} if self.branch is not None else {}
        return {"network": self.deployed_network(), "heads": heads}

    def check_head(self, head: str) -> None:
        """ValueError naming the method's heads when ``head`` is not one of them."""
        if head not in self.heads:
            raise ValueError(
                f"method {self.config.name!r} has no {head!r} head; its heads: "
                f"{', '.join(self.heads)}"
            )
