"""The plumbing every method shares: the student and its wrapper, the supervised loss, the
declared parts (an optional EMA teacher, an optional prototype branch) and the protocol's
defaults. It holds no training step: each method writes its own.

This is the one place that plugs PCR's prototype branch into a method: any method whose
config is a ``PrototypePlugIn`` gets the branch, its head, its bank's k-means at the end of
the warm-up, its update after each optimiser step and its deployed head; the method's step
only hands ``prototype_losses`` a ``PrototypeInputs`` record.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from protoseg.components import (
    PROTOTYPE_HEAD,
    EMATeacher,
    PrototypeBranch,
    PrototypeInputs,
    PrototypePlugIn,
    SupervisedObjective,
    hard_labels,
)
from protoseg.config import Config, MethodConfig, WarmupSettings
from protoseg.lifecycle import ContextFactory, InitContext
from protoseg.methods.protocol import Batch, Deployment, StepOutput, StudentWrapper
from protoseg.models import ParamGroups, param_groups


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of a warm-up stated in epochs of the epoch set."""
    return int(round(warmup_epochs * steps_per_epoch))


def split_outputs(out: dict[str, Tensor], n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Outputs of a concatenated [labelled; unlabelled] batch, split at row ``n``."""
    return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}


class MethodBase(nn.Module):
    """Protocol defaults: a student trained on labelled images, deployed as it is.

    A method declares its parts: its config's type (a ``WarmupSettings`` config has a
    supervised warm-up, a ``PrototypePlugIn`` one gets the prototype branch) and typed
    attributes: ``self.teacher`` (an ``EMATeacher``, moved after each step and deployed),
    ``self.student`` (what the optimiser trains; its ``param_groups()`` gives the lr groups)
    and ``deployed_network()``.
    """

    uses_unlabeled = False
    heads: tuple[str, ...] = ("linear",)
    find_unused_parameters = False
    #: Whether the step supports the plug-in's ``linear_head=false`` (Table 4 (2)): it takes
    #: its pseudo-labels from ``pseudo_labels`` and skips its linear losses without them.
    supports_prototype_only: ClassVar[bool] = False

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.config: MethodConfig = cfg.method
        self.student = model
        self.num_classes, self.ignore_index = cfg.data.num_classes, cfg.data.ignore_index
        self.supervised_loss = SupervisedObjective.from_train_config(cfg.train, self.ignore_index)
        method = cfg.method
        self.warmup_epochs = method.warmup_epochs if isinstance(method, WarmupSettings) else 0.0
        self.warmup_steps = 0
        # The module the student runs through (DDP or compiled); a list keeps it out of
        # the state dict, so checkpoints hold the plain network.
        self._forward: list[nn.Module] = [model]
        # The declared parts; a subclass assigns its teacher after this constructor.
        self.teacher: EMATeacher | None = None
        self.branch: PrototypeBranch | None = None
        if isinstance(self.config, PrototypePlugIn):
            self.attach_prototypes(self.config, model)

    def attach_prototypes(self, plug_in: PrototypePlugIn, model: nn.Module) -> None:
        """Build PCR's prototype branch on ``model``'s decoder features (the plug-in)."""
        if not plug_in.linear_head and not self.supports_prototype_only:
            raise ValueError(
                f"method.linear_head=false: {self.config.name!r} cannot train without its "
                "linear head; only a method whose step takes the prototype head's "
                "pseudo-labels (pcr) supports it"
            )
        feature_dim: int = model.feature_dim  # type: ignore[assignment]
        self.branch = PrototypeBranch(
            plug_in.prototypes,
            self.num_classes,
            feature_dim,
            self.ignore_index,
            linear_head=plug_in.linear_head,
        )
        # The primary head decides the best model and what eval reports first.
        linear, prototype = ("linear",), (PROTOTYPE_HEAD,)
        self.heads = (*linear, *prototype) if plug_in.linear_head else (*prototype, *linear)
        # Without the linear loss the classifier (and aux head) get no gradient.
        self.find_unused_parameters = self.find_unused_parameters or not plug_in.linear_head

    def setup(self, steps_per_epoch: int) -> None:
        """Derive the warm-up length from ``warmup_epochs`` and tell every EMA teacher of
        the method the epoch length (its EMA start may need it)."""
        self.warmup_steps = warmup_steps(self.warmup_epochs, steps_per_epoch)
        for module in self.modules():
            if isinstance(module, EMATeacher):
                module.setup(steps_per_epoch)

    def wrap_student(self, wrap: StudentWrapper) -> nn.Module:
        """Run the student through ``wrap(student, find_unused_parameters)`` from now on."""
        forward = wrap(self.student, self.find_unused_parameters)
        self._forward = [forward]
        return forward

    def param_groups(self) -> ParamGroups:
        """The student's lr groups (backbone, decoder and heads)."""
        return param_groups(self.student)

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

    # ---- the prototype plug-in, as a step sees it ------------------------------------------
    @property
    def trains_linear_head(self) -> bool:
        """False only under the plug-in's ``linear_head=false``: skip the linear losses."""
        return self.branch is None or self.branch.linear_head

    def pseudo_labels(
        self, teacher_out: dict[str, Tensor], size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Labels and confidences of a teacher's outputs (the linear head's, or under
        ``linear_head=false`` the prototype head's)."""
        if self.branch is None:
            return hard_labels(teacher_out["logits"])
        return self.branch.pseudo_labels(teacher_out, size)

    def prototype_losses(self, inputs: PrototypeInputs) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The prototype branch's losses and bank update (zero without a branch)."""
        if self.branch is None:
            return inputs.labels_l.new_zeros((), dtype=torch.float32), {}
        return self.branch.step_losses(inputs)

    # ---- the protocol's hooks ----------------------------------------------------------------
    def before_step(self, step: int, context: ContextFactory) -> None:
        """The bank's k-means (Algorithm 2) once the warm-up is over, if not yet done."""
        if self.needs_init(step):
            self.initialize(context())
            self.train()

    def needs_init(self, step: int) -> bool:
        """A prototype bank needs its k-means initialisation once the warm-up is over."""
        return self.branch is not None and step >= self.warmup_steps and not self.branch.initialized

    def initialize(self, context: InitContext) -> None:
        """Algorithm 2 on the student's features of the labelled set."""
        if self.branch is not None:
            self.branch.initialize(self.student, context)

    def after_optimizer_step(self, step: int) -> None:
        """The bank applies its pending update; the teacher follows the student (a copy of it
        during the warm-up)."""
        if self.branch is not None:
            self.branch.after_optimizer_step()
        if self.teacher is not None:
            self.teacher.follow(self.student, self.teacher_steps(step))

    def teacher_steps(self, step: int) -> int:
        """The EMA teacher's step count after ``step``: steps since the warm-up ended, or a
        negative count while it still copies the student."""
        return step - self.warmup_steps

    def ema_teacher(self) -> EMATeacher | None:
        """The method's declared EMA teacher, if it has one."""
        return self.teacher

    def deployed_network(self) -> nn.Module:
        """The network a model file holds: the EMA teacher if there is one, else the student."""
        return self.teacher.network if self.teacher is not None else self.student

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
