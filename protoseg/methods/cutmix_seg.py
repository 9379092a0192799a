"""CutMix-Seg: EMA teacher pseudo-labels on the weak view, student on the mixed view."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from protoseg.methods.augment import strong_augment
from protoseg.methods.base import Batch, TeacherStudentMethod, unlabeled_valid_mask
from protoseg.methods.losses import masked_cross_entropy


class CutMixSeg(TeacherStudentMethod):
    """Confidence-thresholded pseudo-labels + strong augmentation (Table 1's CutMix-Seg row;
    also PCR's ablation (1), "linear predictor only")."""

    def pseudo_label(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher's hard labels and confidences on the weak view: (B, H, W) each."""
        probs = torch.softmax(self.teacher_forward(images)["logits"].float(), dim=1)
        conf, labels = probs.max(dim=1)
        return labels, conf

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> dict[str, Any]:
        """Supervised loss, plus the masked CE on the mixed unlabelled view after warm-up."""
        x_l, y_l = labeled["image"], labeled["mask"]
        if self.in_warmup(step) or unlabeled is None:
            out = self.student(x_l)
            loss, logs = self.supervised_loss(out, y_l)
            return {"loss": loss, **logs}
        x_u = unlabeled["image"]
        labels, conf = self.pseudo_label(x_u)
        valid = unlabeled_valid_mask(unlabeled, x_u)
        x_m, y_m, conf_m, valid_m = strong_augment(
            self.method_cfg.strong_aug, self.method_cfg.mix_prob, x_u, labels, conf, valid
        )
        keep = (conf_m >= self.method_cfg.confidence_threshold) & valid_m
        out = self.student(torch.cat([x_l, x_m]))
        n = x_l.shape[0]
        out_l = {k: v[:n] for k, v in out.items()}
        out_u = {k: v[n:] for k, v in out.items()}
        loss, logs = self.unlabeled_losses(out_l, out_u, y_l, y_m, keep, valid_m)
        logs["confident_fraction"] = (keep.sum() / valid_m.sum().clamp(min=1)).detach()
        return {"loss": loss, **logs}

    def unlabeled_losses(
        self, out_l: dict, out_u: dict, y_l: Tensor, y_m: Tensor, keep: Tensor, valid_m: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """Linear-head losses on labelled and mixed unlabelled pixels."""
        loss_sup, logs = self.supervised_loss(out_l, y_l)
        loss_unsup = masked_cross_entropy(out_u["logits"], y_m, keep, valid_m)
        logs["loss_unsup"] = loss_unsup.detach()
        return loss_sup + self.method_cfg.unsup_weight * loss_unsup, logs
