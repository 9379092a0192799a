"""CutMix-Seg: EMA-teacher pseudo-labels on the weak view, the student on the mixed view.

Table 1's CutMix-Seg row, and PCR's ablation (1) ("linear predictor only"). With the
prototype plug-in this step is PCR's (``methods/pcr.py``): the branch learns from the mixed
view and its confident pseudo-labels, and under ``linear_head=false`` the pseudo-labels
come from the teacher's prototype head and the linear losses are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protoseg.components import (
    EMATeacher,
    PrototypeInputs,
    SelfTrainingSettings,
    TeacherSettings,
    confident,
    confident_fraction,
    masked_cross_entropy,
    strong_augment,
    valid_pixels,
)
from protoseg.config import Config, MethodConfig
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method


@dataclass
class CutMixSegConfig(SelfTrainingSettings, TeacherSettings, MethodConfig):
    """EMA teacher, confidence threshold and strong augmentation."""

    name: str = "cutmix_seg"

    def check(self) -> None:
        """Validate the teacher and self-training settings."""
        TeacherSettings.check(self)
        SelfTrainingSettings.check(self)


@register_method("cutmix_seg", CutMixSegConfig)
class CutMixSeg(MethodBase):
    """Confidence-thresholded teacher pseudo-labels of a strongly augmented unlabelled view."""

    uses_unlabeled = True
    supports_prototype_only = True

    def __init__(self, model: torch.nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: CutMixSegConfig = cfg.method
        self.teacher: EMATeacher = EMATeacher.from_settings(model, self.config)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised loss, plus the masked CE on the mixed unlabelled view after warm-up."""
        c = self.config
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_u = labeled["image"], labeled["mask"], unlabeled["image"]
        # 1. Pseudo-labels of the teacher's weak view (its linear head, or with the plug-in's
        #    linear_head=false its prototype head), mixed together with the images.
        labels, conf = self.pseudo_labels(self.teacher.predict(x_u), x_u.shape[-2:])
        valid = valid_pixels(unlabeled, x_u)
        x_m, y_m, conf_m, valid_m = strong_augment(
            c.strong_aug, c.mix_prob, x_u, labels, conf, valid
        )
        keep = confident(conf_m, c.confidence_threshold, valid_m)
        # 2. One student pass over labelled and mixed images, as in the release; with
        #    teacher_bn=student_batch the teacher's BN statistics then move on the same batch.
        x_all = torch.cat([x_l, x_m])
        out_l, out_u = split_outputs(self.run_student(x_all), x_l.shape[0])
        self.teacher.refresh_bn(x_all)
        loss = y_l.new_zeros((), dtype=torch.float32)
        logs: dict = {}
        # 3. The linear predictor's losses (Eqs. 4, 6).
        if self.trains_linear_head:
            loss_sup, logs = self.supervised_loss(out_l, y_l)
            loss_unsup = masked_cross_entropy(out_u["logits"], y_m, keep, valid_m)
            loss = loss_sup + c.unsup_weight * loss_unsup
            logs["loss_unsup"] = loss_unsup.detach()
        # 4. With the plug-in (pcr): the prototype losses (Eqs. 5, 7) and the bank's update
        #    (Eq. 11), on the mixed view's confident pseudo-labels.
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(
                out_l["features"], out_u["features"], y_l, y_m, keep, valid_m, c.unsup_weight
            )
        )
        logs.update(proto_logs)
        logs["confident_fraction"] = confident_fraction(keep, valid_m)
        return {"loss": loss + loss_proto, **logs}
