"""UniMatch (Yang et al., CVPR 2023), as released (its ``unimatch.py``).

FixMatch's weak-to-strong self-training with two strong views of every unlabelled image,
each with its own photometric draws and CutMix box, plus a feature-perturbation stream:
the decoder also runs on the weak view's encoder maps with channel dropout (0.5) and is
trained on the weak view's pseudo-labels there. All three unlabelled terms use the
confident pseudo-labels of the student's own train-mode prediction of the weak view, which
shares one pass with the labelled batch and the perturbed decoder (lines 151-159). The loss
is (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 (line 188), i.e. (L_x + lambda (L_s1 +
L_s2) / 2 + mu L_fp) / 2 with ``strong_weight`` lambda and ``fp_weight`` mu. There is no
EMA teacher; the student is deployed.

UniMatch takes the pseudo-labels pasted inside a box from an eval-mode prediction of a
second unlabelled batch (lines 135-140, 166-172); here the partner is image (i + 1) mod B
of the same batch and its pseudo-labels come from the same pass as the image's own (see
``components.weak_strong``), or with ``partner_labels: eval_pass`` from an eval-mode pass as
in UniMatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.components import (
    PhotometricAugment,
    PrototypeInputs,
    PrototypePlugIn,
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


@dataclass
class UniMatchConfig(WeakToStrongSettings, MethodConfig):
    """FixMatch's settings plus the weights of the two streams and the feature dropout."""

    name: str = "unimatch"
    # lambda: weight of the mean loss of the two strong views.
    strong_weight: float = 0.5
    # mu: weight of the feature-perturbation loss.
    fp_weight: float = 0.5
    # Channel dropout on the encoder maps of the feature-perturbation stream.
    fp_dropout: float = 0.5

    def check(self) -> None:
        """Validate the weak-to-strong settings, the weights and the dropout rate."""
        WeakToStrongSettings.check(self)
        if self.strong_weight < 0 or self.fp_weight < 0:
            raise ValueError("method.strong_weight and method.fp_weight must be >= 0")
        if not 0.0 <= self.fp_dropout < 1.0:
            raise ValueError(f"method.fp_dropout={self.fp_dropout} must lie in [0, 1)")


@register_method("unimatch", UniMatchConfig)
class UniMatch(MethodBase):
    """Two strong image views and one perturbed feature view learn from the weak view."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: UniMatchConfig = cfg.method
        self.photometric = PhotometricAugment(cfg.data.mean, cfg.data.std)

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised loss, and after warm-up the two strong views' and the fp stream's."""
        c = self.config
        if self.in_warmup(step) or unlabeled is None:
            return self.supervised_step(labeled)
        x_l, y_l, x_w = labeled["image"], labeled["mask"], unlabeled["image"]
        valid = valid_pixels(unlabeled, x_w)
        # 1. One pass over labelled and weak images; the decoder also runs on their encoder
        #    maps with dropped channels. Pseudo-labels from the clean weak prediction.
        out = self.run_student(torch.cat([x_l, x_w]), perturb=self.drop_channels)
        out_l, out_w = split_outputs(out, x_l.shape[0])
        labels, conf = hard_labels(out_w["logits"].detach())
        keep_w = confident(conf, c.confidence_threshold, valid)
        # 2. Two strong views, each with its own photometric draws and CutMix boxes.
        b, _, h, w = x_w.shape
        partner = None
        if c.partner_labels == "eval_pass":
            partner = eval_pass_labels(self.student, self.run_student, x_w)
        views = []
        for _ in range(2):
            boxes = cutmix_boxes(c.mix_box, c.mix_prob, b, h, w, x_w.device)
            views.append(
                strong_view(
                    self.photometric, boxes, x_w, labels, conf, valid, partner, c.mix_partner
                )
            )
        # 3. The student on both strong views in one pass (UniMatch line 155).
        out_s1, out_s2 = split_outputs(self.run_student(torch.cat([v[0] for v in views])), b)
        # 4. The losses, each unlabelled one over confident real pixels.
        loss_sup, logs = self.supervised_loss(out_l, y_l)
        strong_losses = []
        for out_s, (_, y_s, conf_s, valid_s) in zip((out_s1, out_s2), views):
            keep = confident(conf_s, c.confidence_threshold, valid_s)
            strong_losses.append(masked_cross_entropy(out_s["logits"], y_s, keep, valid_s))
        loss_strong = torch.stack(strong_losses).mean()
        loss_fp = masked_cross_entropy(out_w["perturbed_logits"], labels, keep_w, valid)
        loss = (loss_sup + c.strong_weight * loss_strong + c.fp_weight * loss_fp) / 2
        # 5. With a prototypes block (unimatch+pcr): PCR's branch on both strong views.
        y_s, conf_s, valid_s = (torch.cat([v[i] for v in views]) for i in (1, 2, 3))
        keep_s = confident(conf_s, c.confidence_threshold, valid_s)
        features_s = torch.cat([out_s1["features"], out_s2["features"]])
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(out_l["features"], features_s, y_l, y_s, keep_s, valid_s)
        )
        return {
            "loss": loss + loss_proto,
            **logs,
            **proto_logs,
            "loss_unsup": loss_strong.detach(),
            "loss_fp": loss_fp.detach(),
            # UniMatch's "mask ratio": confident real pixels of the unmixed weak view.
            "confident_fraction": confident_fraction(keep_w, valid),
        }

    def drop_channels(self, features: Tensor) -> Tensor:
        """The feature perturbation: zero whole channels with probability ``fp_dropout``.

        Kept channels are scaled by 1 / (1 - p). It drops even in eval mode, as UniMatch's
        fresh ``nn.Dropout2d`` does; the stream only runs in training steps.
        """
        return F.dropout2d(features, p=self.config.fp_dropout, training=True)


@dataclass
class UniMatchPCRConfig(PrototypePlugIn, UniMatchConfig):
    """UniMatch with PCR's prototype branch plugged in (``unimatch+pcr``).

    The branch learns from both strong views and their pseudo-labels.
    """

    name: str = "unimatch+pcr"


register_method("unimatch+pcr", UniMatchPCRConfig)(UniMatch)
