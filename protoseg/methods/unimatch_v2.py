"""UniMatch V2 (Yang, Zhao, Zhao; TPAMI 2025), as released (its ``unimatch_v2.py``).

An EMA teacher, updated from the first step with decay min(1 - 1/(t+1), 0.996) over
parameters and buffers (lines 221-226), pseudo-labels the weak view in eval mode (lines
170-173): the argmax, kept where the softmax confidence reaches 0.95. The student sees the
labelled batch alone (line 178) and, in a second pass, two strong views of the unlabelled
batch stacked (line 179), each with its own colour jitter, greyscale, blur and CutMix box,
the box filled from the batch reversed (lines 175-176, 184-190), and with complementary
channel dropout between encoder and decoder (``components.feature_dropout``). The
loss is (L_x + (L_s1 + L_s2) / 2) / 2 (lines 202-204), each L_s the CE summed over
confident pixels over the number of real ones (lines 194-200). The teacher is deployed.

The release evaluates the student and the EMA teacher after every epoch (lines 239-241)
and its README reports the teacher's best; here the teacher is the primary head
(``linear``: the deployed network, which decides ``best.pt``) and the student a second
one (``student``), evaluated with ``eval.all_heads`` and never written to a model file.

Per (micro-)batch, as per GPU in the release: the partner order, the dropout masks and the
unmasked half of the images, and the normalisers of L_x and L_s. UniMatch V2 draws the
photometric changes and the boxes per image in its data loader; here they are drawn per
image on the batch, from the same distributions (``PhotometricAugment``, ``cutmix_boxes``).
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
    complementary_dropout,
    confident,
    confident_fraction,
    cutmix_boxes,
    hard_labels,
    masked_cross_entropy,
    require_feature_transform,
    strong_view,
    valid_pixels,
)
from protoseg.config import Config, MethodConfig
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method

#: The head that evaluates the student network itself (the teacher is the primary head).
STUDENT_HEAD = "student"


@dataclass
class UniMatchV2Config(WeakToStrongSettings, TeacherSettings, MethodConfig):
    """The release's recipe: every default is its value (configs/*.yaml, unimatch_v2.py)."""

    name: str = "unimatch_v2"
    # Unlabelled losses and the EMA from the first step (unimatch_v2.py line 221).
    warmup_epochs: float = 0.0
    ema_decay: float = 0.996
    ema_start: str = "ramp"
    # Buffers by the same EMA as the parameters, eval-mode pseudo-labels (lines 88-91).
    teacher_bn: str = "ema"
    confidence_threshold: float = 0.95
    mix_prob: float = 0.5
    mix_box: str = "random_area"
    mix_partner: str = "reversed"
    # Complementary channel dropout on the strong pass (dpt.py lines 148-161).
    comp_drop: bool = True
    # Share of the unlabelled images whose strong views keep every channel (the release:
    # int(B x 0.5) of each GPU's B).
    comp_drop_unmasked: float = 0.5

    def check(self) -> None:
        """Validate the weak-to-strong and teacher settings and the dropout's share."""
        WeakToStrongSettings.check(self)
        TeacherSettings.check(self)
        if not 0.0 <= self.comp_drop_unmasked <= 1.0:
            raise ValueError(
                f"method.comp_drop_unmasked={self.comp_drop_unmasked} must lie in [0, 1]"
            )


@register_method("unimatch_v2", UniMatchV2Config)
class UniMatchV2(MethodBase):
    """Eval-mode EMA pseudo-labels teach two strong views with complementary channels."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: UniMatchV2Config = cfg.method
        c = self.config
        if c.comp_drop:
            require_feature_transform(model, c.name)
        self.teacher: EMATeacher = EMATeacher.from_settings(model, c)
        self.photometric = PhotometricAugment(cfg.data.mean, cfg.data.std)
        # After the teacher's heads (linear, and prototype with the plug-in): the teacher
        # stays primary, as the release's README reports the EMA model.
        self.heads = (*self.heads, STUDENT_HEAD)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """(L_x + (L_s1 + L_s2) / 2) / 2; the supervised loss alone during a warm-up."""
        c = self.config
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_w = labeled["image"], labeled["mask"], unlabeled["image"]
        valid = valid_pixels(unlabeled, x_w)
        # 1. The teacher's eval-mode pseudo-labels of the weak view.
        labels, conf = hard_labels(self.teacher.predict(x_w)["logits"])
        # 2. Two strong views, each with its own photometric draws and CutMix boxes; a box
        #    brings the partner's strong pixels, pseudo-labels, confidences and validity.
        b, _, h, w = x_w.shape
        views = []
        for _ in range(2):
            boxes = cutmix_boxes(c.mix_box, c.mix_prob, b, h, w, x_w.device)
            views.append(
                strong_view(
                    self.photometric, boxes, x_w, labels, conf, valid, partner=c.mix_partner
                )
            )
        # 3. The student: the labelled batch alone, then both strong views in one pass with
        #    complementary channels dropped between its encoder and decoder.
        out_l = self.run_student(x_l)
        x_s = torch.cat([views[0][0], views[1][0]])
        if c.comp_drop:
            out_s = self.run_student(x_s, feature_transform=self.drop_complementary)
        else:
            out_s = self.run_student(x_s)
        out_s1, out_s2 = split_outputs(out_s, b)
        # 4. The losses, each unlabelled one over the confident real pixels of its view.
        loss_x, logs = self.supervised_loss(out_l, y_l)
        strong_losses = []
        for out_view, (_, y_v, conf_v, valid_v) in zip((out_s1, out_s2), views):
            keep = confident(conf_v, c.confidence_threshold, valid_v)
            strong_losses.append(masked_cross_entropy(out_view["logits"], y_v, keep, valid_v))
        loss_s = (strong_losses[0] + strong_losses[1]) / 2
        loss = (loss_x + loss_s) / 2
        # 5. With a prototypes block (unimatch_v2+pcr): PCR's branch on both strong views.
        y_s, conf_s, valid_s = (torch.cat([v[i] for v in views]) for i in (1, 2, 3))
        keep_s = confident(conf_s, c.confidence_threshold, valid_s)
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(out_l["features"], out_s["features"], y_l, y_s, keep_s, valid_s)
        )
        return {
            "loss": loss + loss_proto,
            **logs,
            **proto_logs,
            "loss_unsup": loss_s.detach(),
            "loss_s1": strong_losses[0].detach(),
            "loss_s2": strong_losses[1].detach(),
            # The release's "mask ratio": confident real pixels of the unmixed weak view.
            "confident_fraction": confident_fraction(
                confident(conf, c.confidence_threshold, valid), valid
            ),
        }

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The student network for ``student``; else the deployed teacher with ``head``."""
        self.check_head(head)
        if head == STUDENT_HEAD:
            return self.student
        return super().inference_model(head)

    def drop_complementary(self, features: list[Tensor]) -> list[Tensor]:
        """The strong pass's feature transform: complementary channel dropout of two views."""
        return complementary_dropout(features, self.config.comp_drop_unmasked)


@dataclass
class UniMatchV2PCRConfig(PrototypePlugIn, UniMatchV2Config):
    """UniMatch V2 with PCR's prototype branch plugged in (``unimatch_v2+pcr``).

    The branch learns from the student's features of both strong views (channels dropped)
    and their pseudo-labels; its loss is added to UniMatch V2's.
    """

    name: str = "unimatch_v2+pcr"


register_method("unimatch_v2+pcr", UniMatchV2PCRConfig)(UniMatchV2)
