"""Mean Teacher: consistency between student and EMA teacher on unlabelled images."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from protoseg.methods.base import Batch, TeacherStudentMethod, unlabeled_valid_mask


class MeanTeacher(TeacherStudentMethod):
    """Student on a noisy view, teacher on the clean weak view, squared error of softmaxes."""

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> dict[str, Any]:
        """Supervised loss plus the weighted consistency loss after warm-up."""
        x_l, y_l = labeled["image"], labeled["mask"]
        if self.in_warmup(step) or unlabeled is None:
            loss, logs = self.supervised_loss(self.student(x_l), y_l)
            return {"loss": loss, **logs}
        x_u = unlabeled["image"]
        target = torch.softmax(self.teacher_forward(x_u)["logits"].float(), dim=1)
        noisy = x_u + self.method_cfg.mt_noise_std * torch.randn_like(x_u)
        out = self.student(torch.cat([x_l, noisy]))
        n = x_l.shape[0]
        loss_sup, logs = self.supervised_loss({k: v[:n] for k, v in out.items()}, y_l)
        pred = torch.softmax(out["logits"][n:].float(), dim=1)
        valid = unlabeled_valid_mask(unlabeled, x_u)
        sq = F.mse_loss(pred, target, reduction="none").sum(dim=1)
        loss_cons = (sq * valid).sum() / valid.sum().clamp(min=1)
        loss = loss_sup + self.method_cfg.unsup_weight * loss_cons
        return {"loss": loss, **logs, "loss_consistency": loss_cons.detach()}
