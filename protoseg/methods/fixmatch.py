"""FixMatch for segmentation, as UniMatch releases it (its ``fixmatch.py``).

Pseudo-labels are the argmax of the weak view's prediction, kept where its confidence
reaches tau; they supervise the student's prediction of a strong view (photometric
augmentation and a CutMix box per image). The loss is (L_x + L_s) / 2 (``fixmatch.py``
line 166). The prediction of the weak view is the student's own, from the train-mode pass
it shares with the labelled batch, detached (lines 146-151; ``teacher: self``), or an EMA
teacher's (``teacher: ema``, this module's option). UniMatch takes the pseudo-labels
pasted inside a box from an eval-mode prediction of a second unlabelled batch (lines
132-137); here the partner is image (i + 1) mod B of the same batch and its pseudo-labels
come from the same pass as the image's own (see ``components.weak_strong``), or with
``partner_labels: eval_pass`` from an eval-mode pass as in UniMatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protoseg.components import (
    EMATeacher,
    PhotometricAugment,
    PrototypeInputs,
    PrototypePlugIn,
    TeacherSettings,
    WeakToStrongSettings,
    confident,
    confident_fraction,
    cutmix_boxes,
    eval_pass_labels,
    hard_labels,
    masked_cross_entropy,
    strong_view,
    valid_pixels,
)
from protoseg.config import Config, MethodConfig
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method

TEACHERS = ("self", "ema")


@dataclass
class FixMatchConfig(WeakToStrongSettings, TeacherSettings, MethodConfig):
    """Where the pseudo-labels come from, tau and the strong view's CutMix."""

    name: str = "fixmatch"
    # "self": the student's own prediction of the weak view (UniMatch's FixMatch);
    # "ema": an EMA teacher's (ema_decay, teacher_bn and ema_start apply only then).
    teacher: str = "self"
    # UniMatch trains on unlabelled images from the first step (TeacherSettings says 1).
    warmup_epochs: float = 0.0

    def check(self) -> None:
        """Validate the weak-to-strong and teacher settings and the teacher's kind."""
        WeakToStrongSettings.check(self)
        TeacherSettings.check(self)
        if self.teacher not in TEACHERS:
            raise ValueError(
                f"method.teacher={self.teacher!r}: choose one of {', '.join(TEACHERS)}"
            )


@register_method("fixmatch", FixMatchConfig)
class FixMatch(MethodBase):
    """Confident pseudo-labels of the weak view supervise a photometric + CutMix view."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: FixMatchConfig = cfg.method
        c = self.config
        # MethodBase moves the declared EMA teacher after each step and deploys it; without
        # one the student is deployed.
        self.teacher: EMATeacher | None = None
        if c.teacher == "ema":
            self.teacher = EMATeacher.from_settings(model, c)
        self.photometric = PhotometricAugment(cfg.data.mean, cfg.data.std)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """(Supervised loss + masked CE of the strong view) / 2; the supervised loss in warm-up."""
        c = self.config
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_w = labeled["image"], labeled["mask"], unlabeled["image"]
        valid = valid_pixels(unlabeled, x_w)
        # 1. The student on the labelled batch; pseudo-labels from the weak view.
        out_l, weak_logits = self.labeled_and_weak(x_l, x_w)
        labels, conf = hard_labels(weak_logits)
        # 2. The strong view: its own photometric draws per image and a CutMix box that
        #    brings the partner's pseudo-labels along. It never feeds the pseudo-labels.
        b, _, h, w = x_w.shape
        boxes = cutmix_boxes(c.mix_box, c.mix_prob, b, h, w, x_w.device)
        partner = None
        if c.partner_labels == "eval_pass" and self.teacher is None:
            partner = eval_pass_labels(self.student, self.run_student, x_w)
        x_s, y_s, conf_s, valid_s = strong_view(
            self.photometric, boxes, x_w, labels, conf, valid, partner, c.mix_partner
        )
        keep = confident(conf_s, c.confidence_threshold, valid_s)
        # 3. The student on the strong view (its own pass, as in UniMatch's fixmatch.py).
        out_s = self.run_student(x_s)
        if self.teacher is not None:  # teacher_bn=student_batch: BN moves on these images
            self.teacher.refresh_bn(torch.cat([x_l, x_s]))
        loss_sup, logs = self.supervised_loss(out_l, y_l)
        loss_unsup = masked_cross_entropy(out_s["logits"], y_s, keep, valid_s)
        # 4. With a prototypes block (fixmatch+pcr): PCR's branch on the strong view.
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(out_l["features"], out_s["features"], y_l, y_s, keep, valid_s)
        )
        return {
            "loss": (loss_sup + loss_unsup) / 2 + loss_proto,
            **logs,
            **proto_logs,
            "loss_unsup": loss_unsup.detach(),
            # UniMatch's "mask ratio": confident real pixels of the unmixed weak view.
            "confident_fraction": confident_fraction(
                confident(conf, c.confidence_threshold, valid), valid
            ),
        }

    def labeled_and_weak(self, x_l: Tensor, x_w: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The student's outputs of the labelled batch and the weak view's (detached) logits."""
        if self.teacher is not None:
            return self.run_student(x_l), self.teacher.predict(x_w)["logits"]
        # One train-mode pass: the weak view shares BatchNorm statistics with the labelled
        # batch, as in UniMatch; its gradient-free half only gives the pseudo-labels.
        out_l, out_w = split_outputs(self.run_student(torch.cat([x_l, x_w])), x_l.shape[0])
        return out_l, out_w["logits"].detach()


@dataclass
class FixMatchPCRConfig(PrototypePlugIn, FixMatchConfig):
    """FixMatch with PCR's prototype branch plugged in (``fixmatch+pcr``).

    The branch learns from the strong view and its pseudo-labels, as PCR's does from the
    mixed view.
    """

    name: str = "fixmatch+pcr"


register_method("fixmatch+pcr", FixMatchPCRConfig)(FixMatch)
