"""The EMA teacher: a frozen copy of the student that follows it by exponential moving average."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TEACHER_BN_MODES = ("forward", "copy")


@dataclass
class TeacherSettings:
    """Settings of methods with an EMA teacher (mixed into their config dataclasses)."""

    # Supervised warm-up before any unlabelled loss, in epochs (the release: 1).
    warmup_epochs: float = 1.0
    ema_decay: float = 0.99
    # "forward": teacher BN statistics from a train-mode no-grad forward (the release);
    # "copy": copy the student's BN buffers at every EMA step (cheaper).
    teacher_bn: str = "forward"

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if self.teacher_bn not in TEACHER_BN_MODES:
            choices = ", ".join(TEACHER_BN_MODES)
            raise ValueError(f"method.teacher_bn={self.teacher_bn!r}: choose one of {choices}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"method.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.warmup_epochs < 0:
            raise ValueError(f"method.warmup_epochs={self.warmup_epochs} must be >= 0")


class EMATeacher(nn.Module):
    """A copy of the student, never trained by gradient, moved towards it after each step.

    The decay is ``min(1 - 1/(t+1), ema_decay)`` with ``t`` counted from the end of the
    warm-up, during which the teacher is the student. Parameters are averaged; BatchNorm
    statistics come from a train-mode forward (``bn_mode="forward"``, the release) or are
    copied from the student (``"copy"``).
    """

    def __init__(self, student: nn.Module, ema_decay: float, bn_mode: str = "forward") -> None:
        super().__init__()
        if bn_mode not in TEACHER_BN_MODES:
            raise ValueError(f"unknown teacher BN mode {bn_mode!r}: {TEACHER_BN_MODES}")
        self.network = copy.deepcopy(student)
        for param in self.network.parameters():
            param.requires_grad_(False)
        self.ema_decay, self.bn_mode = ema_decay, bn_mode

    @torch.no_grad()
    def follow(self, student: nn.Module, steps_after_warmup: int) -> None:
        """One EMA step towards ``student``; a negative count copies it (still warming up)."""
        if steps_after_warmup < 0:
            self.network.load_state_dict(student.state_dict())
            return
        decay = min(1.0 - 1.0 / (steps_after_warmup + 1), self.ema_decay)
        for t_param, s_param in zip(self.network.parameters(), student.parameters()):
            t_param.lerp_(s_param.detach(), 1.0 - decay)
        if self.bn_mode == "copy":
            for t_buf, s_buf in zip(self.network.buffers(), student.buffers()):
                t_buf.copy_(s_buf)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Eval-mode predictions; with bn_mode="forward" its BN statistics are first refreshed
        by a train-mode pass on the same images, as in the release."""
        if self.bn_mode == "forward":
            self.network.train()
            self.network(images)
        self.network.eval()
        return self.network(images)

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher's mode is set per forward; it otherwise stays in eval mode."""
        super().train(mode)
        self.network.eval()
        return self
