"""Mean Teacher: consistency between the student and its EMA teacher on unlabelled images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoseg.components import EMATeacher, TeacherSettings, valid_pixels
from protoseg.config import Config, MethodConfig
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method


@dataclass
class MeanTeacherConfig(TeacherSettings, MethodConfig):
    """EMA teacher, consistency weight and the student's input noise."""

    name: str = "mean_teacher"
    unsup_weight: float = 1.0
    # Std of the Gaussian noise added to the student's (normalised) unlabelled view.
    noise_std: float = 0.1

    def check(self) -> None:
        """Validate the teacher settings and the noise."""
        TeacherSettings.check(self)
        if self.noise_std < 0:
            raise ValueError(f"method.noise_std={self.noise_std} must be >= 0")


@register_method("mean_teacher", MeanTeacherConfig)
class MeanTeacher(MethodBase):
    """Student on a noisy view, teacher on the clean weak view, squared error of softmaxes."""

    uses_unlabeled = True

    def __init__(self, model: torch.nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: MeanTeacherConfig = cfg.method
        self.teacher: EMATeacher = EMATeacher.from_settings(model, self.config)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised loss plus the weighted consistency loss after warm-up."""
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_u = labeled["image"], labeled["mask"], unlabeled["image"]
        target = torch.softmax(self.teacher.predict(x_u)["logits"].float(), dim=1)
        noisy = x_u + self.config.noise_std * torch.randn_like(x_u)
        # With teacher_bn=student_batch the teacher's BN statistics move on the student's batch.
        x_all = torch.cat([x_l, noisy])
        out_l, out_u = split_outputs(self.run_student(x_all), x_l.shape[0])
        self.teacher.refresh_bn(x_all)
        loss_sup, logs = self.supervised_loss(out_l, y_l)
        pred = torch.softmax(out_u["logits"].float(), dim=1)
        valid = valid_pixels(unlabeled, x_u)
        squared = F.mse_loss(pred, target, reduction="none").sum(dim=1)
        loss_cons = (squared * valid).sum() / valid.sum().clamp(min=1)
        loss = loss_sup + self.config.unsup_weight * loss_cons
        return {"loss": loss, **logs, "loss_consistency": loss_cons.detach()}
