"""U2PL: semi-supervised segmentation using unreliable pseudo-labels (Wang et al., CVPR 2022).

The codebase PCR's training ran on. An EMA teacher labels the weak view; the student trains
on the CutMix view with cross-entropy on the *reliable* pixels only (below an entropy
percentile whose share shrinks over training), and the *unreliable* pixels serve as
negative keys of a pixel contrastive loss on a representation head, drawn from per-class
memory queues. Follows the release's ``train_semi.py`` and ``u2pl/utils/loss_helper.py``
(``compute_unsupervised_loss``, ``compute_contra_memobank_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.components import (
    ClassQueues,
    ContrastConfig,
    EMATeacher,
    PrototypeInputs,
    PrototypePlugIn,
    TeacherSettings,
    above_percentile,
    below_percentile,
    check_strong_augmentation,
    contrastive_loss,
    hard_labels,
    pixel_entropy,
    reliable_cross_entropy,
    strong_augment,
    valid_pixels,
)
from protoseg.config import Config, MethodConfig
from protoseg.methods.common import MethodBase, split_outputs, warmup_steps
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method
from protoseg.models import ParamGroups, param_groups


@dataclass
class U2PLConfig(TeacherSettings, MethodConfig):
    """U2PL's ``trainer.unsupervised`` and ``trainer.contrastive`` settings."""

    name: str = "u2pl"
    # Epochs after the warm-up in which the teacher is a copy of the student: the release
    # copies the parameters at every step of epoch ``sup_only_epoch``.
    teacher_copy_epochs: float = 1.0
    unsup_weight: float = 1.0
    # The unreliable share of the CE starts at 100 - drop_percent percent and falls
    # linearly to 0 (per epoch, as the release).
    drop_percent: float = 80.0
    strong_aug: str = "cutmix"
    mix_prob: float = 0.5
    contrast: ContrastConfig = field(default_factory=ContrastConfig)

    def check(self) -> None:
        """Validate the teacher, the partition and the contrast block."""
        TeacherSettings.check(self)
        self.contrast.check()
        if not 0.0 <= self.drop_percent <= 100.0:
            raise ValueError("method.drop_percent must lie in [0, 100]")
        if self.teacher_copy_epochs < 0:
            raise ValueError("method.teacher_copy_epochs must be >= 0")
        check_strong_augmentation(self.strong_aug, self.mix_prob)


def representation_head(in_ch: int, hidden: int, out_ch: int, dropout: float) -> nn.Sequential:
    """The release's representation head: two 3x3 conv-BN-ReLU-dropout blocks and a 1x1 conv."""
    return nn.Sequential(
        nn.Conv2d(in_ch, hidden, 3, padding=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(hidden, out_ch, 1),
    )


class WithRepresentation(nn.Module):
    """The student U2PL trains: the network plus a representation head on its features.

    One forward returns the network's outputs and ``rep``, so a DDP wrapper of this module
    sees every trained parameter; ``param_groups`` puts the head with the decoder (the
    release's head sits in its decoder). The network keeps its own state-dict names under
    ``network.``, so the deployed network is saved exactly as other methods save theirs.
    """

    def __init__(self, network: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.network, self.representation = network, head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The network's outputs and ``rep``: the representation of its stride-4 features."""
        out = dict(self.network(images))
        out["rep"] = self.representation(out["features"])
        return out

    def param_groups(self) -> ParamGroups:
        """(backbone parameters, decoder and both heads' parameters)."""
        backbone, decoder = param_groups(self.network)
        return backbone, [*decoder, *self.representation.parameters()]


@register_method("u2pl", U2PLConfig)
class U2PL(MethodBase):
    """Reliable pseudo-labels for the CE, unreliable ones as contrastive negatives."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: U2PLConfig = cfg.method
        c, m = self.config, cfg.model
        head: nn.Module = representation_head(
            model.feature_dim,  # type: ignore[arg-type]
            m.head_channels,
            c.contrast.dim,
            m.dropout,
        )
        if any(isinstance(mod, nn.SyncBatchNorm) for mod in model.modules()):
            head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
        self.student = WithRepresentation(model, head)
        self._forward = [self.student]
        # The teacher holds a representation head too: the positives and keys are its.
        self.teacher: EMATeacher = EMATeacher(self.student, c.ema_decay, c.teacher_bn)
        self.queues = ClassQueues(c.contrast.capacities(self.num_classes), c.contrast.dim)
        self.train_cfg = cfg.train
        self.steps_per_epoch, self.total_steps, self.copy_steps = 1, 1, 0

    def setup(self, steps_per_epoch: int) -> None:
        """Warm-up, teacher-copy and schedule lengths in steps."""
        super().setup(steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = self.train_cfg.total_steps(steps_per_epoch)
        self.copy_steps = warmup_steps(self.config.teacher_copy_epochs, steps_per_epoch)

    def progress(self, step: int) -> float:
        """epoch / epochs of the release's schedules, with the epoch a whole number."""
        epoch_start = step // self.steps_per_epoch * self.steps_per_epoch
        return min(1.0, epoch_start / self.total_steps)

    @torch.no_grad()
    def teacher_forward(self, images: Tensor, train: bool) -> dict[str, Tensor]:
        """The teacher's outputs in eval mode (pseudo-labels) or train mode (batch statistics
        and dropout, as the release's second teacher pass, which also moves its BN statistics)."""
        network = self.teacher.network
        network.train(train)
        try:
            return network(images)
        finally:
            network.eval()

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised warm-up; then the reliable CE and the contrastive loss on the mixed view."""
        c = self.config
        x_l, y_l = labeled["image"], labeled["mask"]
        if self.in_warmup(step) or unlabeled is None:
            out = self.run_student(x_l)
            loss, logs = self.supervised_loss(out, y_l)
            # The head takes no part yet; a zero term keeps it in the graph, so DDP finds a
            # gradient for every parameter (the release adds 0 * rep.sum() alike).
            return {"loss": loss + 0.0 * out["rep"].sum(), **logs}
        x_u, n = unlabeled["image"], x_l.shape[0]
        # 1. Pseudo-labels: the teacher's eval-mode prediction of the weak view.
        labels, conf = hard_labels(self.teacher_forward(x_u, train=False)["logits"])
        # 2. The strong view: images, pseudo-labels and validity mixed alike. Cutout zeroes
        #    the confidence of the pixels it erases, which the release ignores.
        valid = valid_pixels(unlabeled, x_u)
        x_m, y_m, conf_m, valid_m = strong_augment(
            c.strong_aug, c.mix_prob, x_u, labels, conf, valid
        )
        valid_m = valid_m & (conf_m > 0)
        # 3. One student pass over labelled and mixed images.
        images = torch.cat([x_l, x_m])
        out = self.run_student(images)
        out_l, out_u = split_outputs(out, n)
        loss_sup, logs = self.supervised_loss(out_l, y_l)
        # 4. The teacher's train-mode pass over the same images, after the student's as in
        #    the release: its entropies partition the mixed pixels.
        teacher = self.teacher_forward(images, train=True)
        entropy = pixel_entropy(teacher["logits"][n:])
        share = (100.0 - c.drop_percent) * (1.0 - self.progress(step))
        unreliable = above_percentile(entropy, valid_m, 100.0 - share)
        reliable = valid_m & ~unreliable
        # 5. Cross-entropy on the reliable pixels only.
        loss_unsup = reliable_cross_entropy(out_u["logits"], y_m, reliable, valid_m)
        # 6. The contrastive loss: anchors from reliable pixels, negatives from unreliable ones.
        loss_contrast = self.contrast(out["rep"], teacher, y_l, y_m, valid_m, entropy, step)
        # 7. With a prototypes block (u2pl+pcr): PCR's branch on the mixed view, learning
        #    the pixels U2PL's cross-entropy trusts (its reliable ones).
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(
                out_l["features"], out_u["features"], y_l, y_m, reliable, valid_m, c.unsup_weight
            )
        )
        return {
            "loss": loss_sup
            + c.unsup_weight * loss_unsup
            + c.contrast.weight * loss_contrast
            + loss_proto,
            **logs,
            **proto_logs,
            "loss_unsup": loss_unsup.detach(),
            "loss_contrast": loss_contrast.detach(),
            "reliable_fraction": (reliable.sum() / valid_m.sum().clamp(min=1)).detach(),
        }

    def contrast(
        self,
        rep: Tensor,
        teacher: dict[str, Tensor],
        y_l: Tensor,
        y_m: Tensor,
        valid_m: Tensor,
        entropy: Tensor,
        step: int,
    ) -> Tensor:
        """The contrastive loss at the representation's resolution (the release's masks)."""
        cfg, n = self.config.contrast, y_l.shape[0]
        alpha = cfg.low_entropy_threshold * (1.0 - self.progress(step))
        low = below_percentile(entropy, valid_m, alpha)
        high = above_percentile(entropy, valid_m, 100.0 - alpha)
        labeled = y_l != self.ignore_index
        labels = torch.cat([y_l, torch.where(valid_m, y_m, torch.full_like(y_m, -1))])
        size = rep.shape[-2:]
        # Labelled pixels are both anchors and negative candidates, as in the release.
        reliable = _nearest(torch.cat([labeled, low]), size).bool()
        unreliable = _nearest(torch.cat([labeled, high]), size).bool()
        # The release's teacher probabilities are those of its stride-4 logits; resampling the
        # upsampled ones with align_corners returns them exactly at its crops (513, 769).
        prob = torch.softmax(_resize(teacher["logits"].float(), size), dim=1)
        return contrastive_loss(
            rep,
            teacher["rep"],
            prob,
            _nearest(labels, size).long(),
            reliable,
            unreliable,
            n,
            self.queues,
            cfg,
        )

    def teacher_steps(self, step: int) -> int:
        """The teacher copies the student until a copy epoch after warm-up, then follows it."""
        after = step - self.warmup_steps
        return -1 if after < self.copy_steps else after

    def deployed_network(self) -> nn.Module:
        """The EMA teacher's network (without the representation head), as the release."""
        return self.teacher.network.network  # type: ignore[return-value]


@dataclass
class U2PLPCRConfig(PrototypePlugIn, U2PLConfig):
    """U2PL with PCR's prototype branch plugged in (``u2pl+pcr``).

    The branch learns from the mixed view's reliable pixels (those U2PL's cross-entropy
    learns); the unreliable ones stay contrastive negatives only.
    """

    name: str = "u2pl+pcr"


register_method("u2pl+pcr", U2PLPCRConfig)(U2PL)


def _nearest(t: Tensor, size: torch.Size) -> Tensor:
    """(B, H, W) maps resampled to ``size`` by nearest neighbour (the release's masks)."""
    return F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]


def _resize(t: Tensor, size: torch.Size) -> Tensor:
    """(B, C, H, W) maps resampled bilinearly with align_corners=True."""
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)
