"""The method interface: a small object that turns batches into a loss, separate from the loop."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from protoseg.config import Config
from protoseg.methods.losses import SegmentationLoss

Batch = dict[str, Any]


@dataclass
class WarmupContext:
    """What a method may use when the supervised warm-up ends (e.g. to build a prototype bank).

    ``labeled_loader`` yields the whole labelled set at original size with eval transforms;
    it is only given to rank 0, other ranks receive None and wait for a broadcast.
    """

    labeled_loader: Iterable[Batch] | None
    device: torch.device
    seed: int = 0


class Method(nn.Module):
    """Base class: owns the student model; subclasses add a teacher, a bank, extra losses.

    ``training_step`` returns ``{"loss": scalar tensor, <name>: float | tensor, ...}``; every
    entry but ``loss`` is logged. The engine calls ``after_optimizer_step`` after each
    optimiser update and ``on_warmup_end`` once when ``step == warmup_steps``.
    """

    uses_unlabeled = False

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.method_cfg = cfg.method
        self.ignore_index = cfg.data.ignore_index
        self.num_classes = cfg.data.num_classes
        self.criterion = SegmentationLoss(
            cfg.train.loss, cfg.data.ignore_index, cfg.train.ohem_threshold, cfg.train.ohem_min_kept
        )
        self.aux_weight = cfg.train.aux_weight
        self.warmup_steps = 0
        # The module the student runs through (a DDP or compiled wrapper), kept out of
        # the state dict so checkpoints hold the plain model.
        self._student_forward: list[nn.Module] = [model]

    # ---- set-up hooks used by the engine ----------------------------------------------------
    def setup(self, steps_per_epoch: int) -> None:
        """Derive step counts from the schedule (e.g. the warm-up length)."""
        self.warmup_steps = int(round(self.method_cfg.warmup_epochs * steps_per_epoch))

    def set_student_forward(self, module: nn.Module) -> None:
        """Run the student through ``module`` (a DDP/compiled wrapper of ``self.model``)."""
        self._student_forward = [module]

    @property
    def find_unused_parameters(self) -> bool:
        """Whether some student parameters get no gradient (DDP must be told)."""
        return False

    def student(self, images: Tensor) -> dict[str, Tensor]:
        """Forward the student (through its wrapper, if any)."""
        return self._student_forward[0](images)

    # ---- pieces shared by every method --------------------------------------------------------
    def supervised_loss(self, out: dict[str, Tensor], mask: Tensor) -> tuple[Tensor, dict]:
        """Linear-head loss on labelled pixels, plus the auxiliary head where present."""
        loss = self.criterion(out["logits"], mask)
        logs = {"loss_sup": loss.detach()}
        if "aux" in out and self.aux_weight > 0:
            aux = self.criterion(out["aux"], mask)
            logs["loss_aux"] = aux.detach()
            loss = loss + self.aux_weight * aux
        return loss, logs

    def in_warmup(self, step: int) -> bool:
        """True while only the supervised loss trains the student."""
        return step < self.warmup_steps

    # ---- the interface ----------------------------------------------------------------
    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> dict[str, Any]:
        """Loss of one (micro-)batch; labelled and unlabelled batches are dicts of tensors."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimiser update (EMA teachers move here)."""

    def on_warmup_end(self, context: WarmupContext) -> None:
        """Called once when the warm-up ends (also at step 0 when there is none)."""

    def needs_warmup_hook(self) -> bool:
        """Whether ``on_warmup_end`` still has to run (e.g. after resuming past it)."""
        return False

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The network that makes predictions: returns ``{"logits": ...}`` for an image batch."""
        if head != "linear":
            raise ValueError(f"{type(self).__name__} has no {head!r} head")
        return self.model

    @property
    def heads(self) -> tuple[str, ...]:
        """Prediction heads that ``inference_model`` accepts."""
        return ("linear",)


class TeacherStudentMethod(Method):
    """A method with an EMA teacher that makes the targets of unlabelled images."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """EMA of the student's parameters, decay min(1 - 1/(t+1), ema) with t after warm-up."""
        if self.in_warmup(step):
            # During warm-up the teacher is the student.
            self.teacher.load_state_dict(self.model.state_dict())
            return
        t = step - self.warmup_steps
        decay = min(1.0 - 1.0 / (t + 1), self.method_cfg.ema_decay)
        for t_param, s_param in zip(self.teacher.parameters(), self.model.parameters()):
            t_param.lerp_(s_param.detach(), 1.0 - decay)
        if self.method_cfg.teacher_bn == "copy":
            for t_buf, s_buf in zip(self.teacher.buffers(), self.model.buffers()):
                t_buf.copy_(s_buf)

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        """Teacher predictions in eval mode; with teacher_bn=forward its BN statistics are
        first refreshed by a train-mode pass, as in the release."""
        if self.method_cfg.teacher_bn == "forward":
            self.teacher.train()
            self.teacher(images)
        self.teacher.eval()
        return self.teacher(images)

    def train(self, mode: bool = True) -> TeacherStudentMethod:
        """Put the student in ``mode``; the teacher's mode is set per forward."""
        super().train(mode)
        self.teacher.eval()
        return self

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The teacher is the deployed model (Algorithm 1's output)."""
        if head != "linear":
            raise ValueError(f"{type(self).__name__} has no {head!r} head")
        return self.teacher


def unlabeled_valid_mask(batch: Batch, like: Tensor) -> Tensor:
    """Which pixels of an unlabelled crop are real image (not padding): (B, H, W) bool."""
    if "valid" in batch:
        return batch["valid"].to(like.device).bool()
    return torch.ones(like.shape[0], *like.shape[2:], dtype=torch.bool, device=like.device)
