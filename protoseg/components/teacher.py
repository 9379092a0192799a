"""The EMA teacher: a frozen copy of the student that follows it by exponential moving average."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protoseg.config import WarmupSettings

TEACHER_BN_MODES = ("forward", "student_batch", "copy", "ema")
EMA_STARTS = ("ramp", "after_epoch")


@dataclass
class TeacherSettings(WarmupSettings):
    """Settings of methods with an EMA teacher (mixed into their config dataclasses)."""

    # Supervised warm-up before any unlabelled loss, in epochs (the release: 1).
    warmup_epochs: float = 1.0
    ema_decay: float = 0.99
    # Where the teacher's BatchNorm statistics come from:
    # "forward": a train-mode no-grad teacher pass on the weak unlabelled batch, just before
    #   it pseudo-labels that batch;
    # "student_batch": a train-mode no-grad teacher pass on the student's batch (labelled +
    #   mixed images) after the pseudo-labels are made, as U2PL's loop (the release) does;
    # "copy": the student's BN buffers, copied at every EMA step (cheapest);
    # "ema": every floating-point buffer follows the student's by the same EMA as the
    #   parameters, and the teacher predicts in eval mode with no refresh pass (UniMatch
    #   V2's loop, its unimatch_v2.py lines 221-226).
    teacher_bn: str = "forward"
    # When the EMA starts after the warm-up:
    # "ramp": decay min(1 - 1/(t+1), ema_decay) from the first semi-supervised step;
    # "after_epoch": the teacher's parameters equal the student's for one more epoch (U2PL's
    #   loop, the release), then the same formula, whose decay is ema_decay by then.
    ema_start: str = "ramp"

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if self.teacher_bn not in TEACHER_BN_MODES:
            choices = ", ".join(TEACHER_BN_MODES)
            raise ValueError(f"method.teacher_bn={self.teacher_bn!r}: choose one of {choices}")
        if self.ema_start not in EMA_STARTS:
            choices = ", ".join(EMA_STARTS)
            raise ValueError(f"method.ema_start={self.ema_start!r}: choose one of {choices}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"method.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.warmup_epochs < 0:
            raise ValueError(f"method.warmup_epochs={self.warmup_epochs} must be >= 0")


class EMATeacher(nn.Module):
    """A copy of the student, never trained by gradient, moved towards it after each step.

    During the warm-up the teacher is the student (parameters and buffers). After it, the
    parameters move by EMA with decay ``min(1 - 1/(t+1), ema_decay)``, ``t`` counted from
    the end of the warm-up; with ``ema_start="after_epoch"`` the decay is 0 (a copy) for
    the first ``steps_per_epoch`` of them (see ``setup``). Buffers (BatchNorm statistics)
    follow ``bn_mode`` (see ``TeacherSettings.teacher_bn``); ``bn_mode="ema"`` moves them
    with the parameters by the same decay.
    """

    def __init__(
        self,
        student: nn.Module,
        ema_decay: float,
        bn_mode: str = "forward",
        ema_start: str = "ramp",
    ) -> None:
        super().__init__()
        if bn_mode not in TEACHER_BN_MODES:
            raise ValueError(f"unknown teacher BN mode {bn_mode!r}: {TEACHER_BN_MODES}")
        if ema_start not in EMA_STARTS:
            raise ValueError(f"unknown EMA start {ema_start!r}: {EMA_STARTS}")
        self.network = copy.deepcopy(student)
        for param in self.network.parameters():
            param.requires_grad_(False)
        self.ema_decay, self.bn_mode, self.ema_start = ema_decay, bn_mode, ema_start
        # Steps after the warm-up during which the teacher copies the student's parameters.
        self.copy_steps = 0

    @classmethod
    def from_settings(cls, student: nn.Module, settings: TeacherSettings) -> EMATeacher:
        """The teacher of ``student`` as a method's ``TeacherSettings`` describe it."""
        return cls(student, settings.ema_decay, settings.teacher_bn, settings.ema_start)

    def setup(self, steps_per_epoch: int) -> None:
        """Learn the epoch length (``ema_start="after_epoch"`` copies for one epoch)."""
        self.copy_steps = steps_per_epoch if self.ema_start == "after_epoch" else 0

    def decay(self, steps_after_warmup: int) -> float:
        """The EMA decay of the update after semi-supervised step ``steps_after_warmup``."""
        if steps_after_warmup < self.copy_steps:
            return 0.0
        return min(1.0 - 1.0 / (steps_after_warmup + 1), self.ema_decay)

    @torch.no_grad()
    def follow(self, student: nn.Module, steps_after_warmup: int) -> None:
        """One EMA step towards ``student``; a negative count copies it (still warming up)."""
        if steps_after_warmup < 0:
            self.network.load_state_dict(student.state_dict())
            return
        decay = self.decay(steps_after_warmup)
        for t_param, s_param in zip(self.network.parameters(), student.parameters()):
            t_param.lerp_(s_param.detach(), 1.0 - decay)
        if self.bn_mode == "copy":
            for t_buf, s_buf in zip(self.network.buffers(), student.buffers()):
                t_buf.copy_(s_buf)
        elif self.bn_mode == "ema":
            for t_buf, s_buf in zip(self.network.buffers(), student.buffers()):
                if t_buf.is_floating_point():
                    t_buf.lerp_(s_buf.detach().to(t_buf.dtype), 1.0 - decay)
                else:
                    # A count (BatchNorm's num_batches_tracked) has no average; UniMatch
                    # V2's arithmetic truncates one back into the integer buffer, so its
                    # value there is meaningless either way: take the student's.
                    t_buf.copy_(s_buf)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Eval-mode predictions; with bn_mode="forward" a train-mode pass on the same images
        first refreshes the BN statistics they are normalised with."""
        if self.bn_mode == "forward":
            self._train_mode_pass(images)
        self.network.eval()
        return self.network(images)

    @torch.no_grad()
    def refresh_bn(self, images: Tensor) -> None:
        """With bn_mode="student_batch", a train-mode pass on ``images`` (the student's batch):
        it moves the BN statistics the next pseudo-labels use. A no-op in the other modes."""
        if self.bn_mode == "student_batch":
            self._train_mode_pass(images)

    def _train_mode_pass(self, images: Tensor) -> None:
        self.network.train()
        self.network(images)
        self.network.eval()

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher's mode is set per forward; it otherwise stays in eval mode."""
        super().train(mode)
        self.network.eval()
        return self
