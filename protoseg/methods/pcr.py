"""PCR: prototype-based consistency regularisation (Xu et al., NeurIPS 2022).

CutMix-Seg's teacher-student step plus a prototype predictor on the student's decoder
features (the prototype branch component), trained on labelled pixels and on confident
teacher pseudo-labels of the mixed view (Eqs. 4-10), with a bank initialised by k-means
after the warm-up (Algorithm 2) and moved by EMA (Eq. 11). Table 4's ablations are switches:
(1) ``prototypes.train_predictor=false`` and ``prototypes.update=false`` (linear predictor
only), (2) ``linear_head=false`` (prototype predictor only: pseudo-labels and evaluation
from the prototype head), (3) ``prototypes.update=false`` (a fixed bank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from protoseg.components import (
    PROTOTYPE_HEAD,
    EMATeacher,
    PrototypeBranch,
    PrototypeConfig,
    SelfTrainingSettings,
    TeacherSettings,
    confident,
    confident_fraction,
    hard_labels,
    masked_cross_entropy,
    strong_augment,
    valid_pixels,
)
from protoseg.config import Config, MethodConfig
from protoseg.methods import register_method
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput


@dataclass
class PCRConfig(SelfTrainingSettings, TeacherSettings, MethodConfig):
    """CutMix-Seg's settings, the linear-head switch and the prototype branch's block."""

    name: str = "pcr"
    # Table 4 (2): without the linear head's losses the prototype head makes the
    # pseudo-labels and the predictions.
    linear_head: bool = True
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)

    def check(self) -> None:
        """Validate every block and the ablation switches together."""
        TeacherSettings.check(self)
        SelfTrainingSettings.check(self)
        self.prototypes.check()
        if not self.linear_head and not self.prototypes.train_predictor:
            raise ValueError(
                "method.linear_head and method.prototypes.train_predictor cannot both be false"
            )


@register_method("pcr", PCRConfig)
class PCR(MethodBase):
    """The paper's method: CutMix-Seg plus the prototype branch."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)  # builds the prototype branch from method.prototypes
        self.config: PCRConfig = cfg.method
        c = self.config
        self.teacher = EMATeacher.from_settings(model, self.config)
        # The primary head decides the best model and what eval reports first.
        self.heads = ("linear", PROTOTYPE_HEAD) if c.linear_head else (PROTOTYPE_HEAD, "linear")
        # Without the linear loss the classifier (and aux head) get no gradient.
        self.find_unused_parameters = not c.linear_head

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised warm-up; then linear and prototype losses on labelled and mixed pixels."""
        c = self.config
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_u = labeled["image"], labeled["mask"], unlabeled["image"]
        # 1. Pseudo-labels of the weak view: the teacher's linear head, or (ablation 2) its
        #    prototype head.
        teacher_out = self.teacher.predict(x_u)
        if c.linear_head:
            labels, conf = hard_labels(teacher_out["logits"])
        else:
            labels, conf = self.bank_branch().pseudo_label(teacher_out["features"], x_u.shape[-2:])
        # 2. The strong view: images, pseudo-labels and confidences mixed alike.
        valid = valid_pixels(unlabeled, x_u)
        x_m, y_m, conf_m, valid_m = strong_augment(
            c.strong_aug, c.mix_prob, x_u, labels, conf, valid
        )
        keep = confident(conf_m, c.confidence_threshold, valid_m)
        # 3. One student pass over labelled and mixed images; with teacher_bn=student_batch
        # the teacher's BN statistics then move on the same batch (U2PL's loop).
        x_all = torch.cat([x_l, x_m])
        out_l, out_u = split_outputs(self.run_student(x_all), x_l.shape[0])
        self.teacher.refresh_bn(x_all)
        loss = y_l.new_zeros((), dtype=torch.float32)
        logs: dict = {}
        # 4. The linear predictor's losses (Eqs. 4, 6).
        if c.linear_head:
            loss_sup, logs = self.supervised_loss(out_l, y_l)
            loss_unsup = masked_cross_entropy(out_u["logits"], y_m, keep, valid_m)
            loss = loss_sup + c.unsup_weight * loss_unsup
            logs["loss_unsup"] = loss_unsup.detach()
        # 5. The prototype predictor's losses (Eqs. 5, 7) and the bank's update (Eq. 11),
        #    on confident pseudo-labels only.
        loss_proto, proto_logs = self.prototype_losses(
            out_l, out_u, y_l, y_m, keep, valid_m, c.unsup_weight
        )
        logs.update(proto_logs)
        logs["confident_fraction"] = confident_fraction(keep, valid_m)
        return {"loss": loss + loss_proto, **logs}

    def bank_branch(self) -> PrototypeBranch:
        """PCR always has its prototype branch (its config's ``prototypes`` block)."""
        if self.branch is None:
            raise RuntimeError("PCR was built without its prototype branch")
        return self.branch
