"""CPS: cross pseudo supervision (Chen et al., CVPR 2021), in its CutMix setting.

Two networks of the same architecture, initialised differently, train side by side: each
learns the labelled images, and each learns the other's hard pseudo-labels (argmax) of a
CutMix view of the unlabelled images. As in the release's ``exp.voc/voc8.res50v3+.CPS+CutMix
/train.py``, both networks first predict the *unmixed* images without gradient, and their
label maps are mixed with the same box masks as the images. The first network is deployed:
the release evaluates ``branch1``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from protoseg.components import (
    PrototypeInputs,
    PrototypePlugIn,
    box_masks,
    masked_cross_entropy,
    valid_pixels,
)
from protoseg.components.augment import paste_from_partner
from protoseg.config import Config, MethodConfig, WarmupSettings
from protoseg.methods.common import MethodBase, split_outputs
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method
from protoseg.models import ParamGroups, create_model, param_groups

# The second network is built as the first, from the run's seed plus this.
SECOND_SEED_OFFSET = 1
# Output keys of the second network inside the pair's output.
RIGHT = "right_"


@dataclass
class CPSConfig(WarmupSettings, MethodConfig):
    """The CPS weight and the release's CutMix box masks."""

    name: str = "cps"
    # Supervised-only steps first (the release has none).
    warmup_epochs: float = 0.0
    # The release's CPS+CutMix configs: 1 on VOC, 5 on Cityscapes (1.5 and 6 without CutMix).
    cps_weight: float = 1.0
    # Each image gets mix_boxes boxes covering a share of it drawn from mix_area_range.
    mix_area_range: list[float] = field(default_factory=lambda: [0.25, 0.5])
    mix_boxes: int = 3
    # false: one no-grad pass over the unlabelled batch, one pass over labelled + mixed
    # images. true: the release's passes (train.py lines 209-243): no-grad passes over the
    # batch and over its partner batch (image (i + 1) mod B), the mixed images, then the
    # labelled images, each normalised by its own BatchNorm statistics; one no-grad pass
    # more per step. docs/parity.md measures the difference.
    release_passes: bool = False

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if self.warmup_epochs < 0:
            raise ValueError(f"method.warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.cps_weight < 0:
            raise ValueError("method.cps_weight must be >= 0")
        area = self.mix_area_range
        if len(area) != 2 or not 0.0 <= area[0] <= area[1] <= 1.0:
            raise ValueError(f"method.mix_area_range={area} must be [low, high] in [0, 1]")
        if self.mix_boxes < 1:
            raise ValueError("method.mix_boxes must be >= 1")


class NetworkPair(nn.Module):
    """Both networks as one student: one forward runs both, so DDP sees every parameter.

    The first network's outputs keep their keys; the second's carry the ``right_`` prefix.
    """

    def __init__(self, left: nn.Module, right: nn.Module) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Both networks' outputs on the same images."""
        out = dict(self.left(images))
        out.update({RIGHT + k: v for k, v in self.right(images).items()})
        return out

    @staticmethod
    def split(out: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The first and the second network's outputs of a pair's output."""
        left = {k: v for k, v in out.items() if not k.startswith(RIGHT)}
        right = {k[len(RIGHT) :]: v for k, v in out.items() if k.startswith(RIGHT)}
        return left, right

    def param_groups(self) -> ParamGroups:
        """(both backbones' parameters, both decoders' and heads' parameters)."""
        backbone: list[nn.Parameter] = []
        decoder: list[nn.Parameter] = []
        for network in (self.left, self.right):
            b, d = param_groups(network)
            backbone += b
            decoder += d
        return backbone, decoder


def second_network(model: nn.Module, cfg: Config) -> nn.Module:
    """A network like ``model`` with the weights a build from another seed gives.

    The build loads the same pretrained backbone (as both of the release's branches do), so
    with pretrained weights only the randomly initialised parts differ. Copying ``model``
    first keeps what the trainer did to it (SyncBatchNorm, memory format, device).
    """
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: fork_rng(devices=[]) would not restore the accelerators'.
        torch.default_generator.manual_seed(cfg.train.seed + SECOND_SEED_OFFSET)
        fresh = create_model(cfg.model, cfg.data.num_classes)
    right = copy.deepcopy(model)
    right.load_state_dict(fresh.state_dict())
    return right


@register_method("cps", CPSConfig)
class CPS(MethodBase):
    """Two networks, each trained on the other's pseudo-labels of the mixed view."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        self.config: CPSConfig = cfg.method
        self.student = NetworkPair(model, second_network(model, cfg))
        self._forward = [self.student]

    def both_supervised(
        self, left: dict[str, Tensor], right: dict[str, Tensor], mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The two networks' supervised losses, summed (and their logged terms, summed)."""
        loss_l, logs_l = self.supervised_loss(left, mask)
        loss_r, logs_r = self.supervised_loss(right, mask)
        return loss_l + loss_r, {k: logs_l[k] + logs_r[k] for k in logs_l}

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Both supervised losses, plus the cross pseudo-supervision on the mixed view."""
        c = self.config
        x_l, y_l = labeled["image"], labeled["mask"]
        if self.in_warmup(step) or unlabeled is None:
            loss, logs = self.both_supervised(*NetworkPair.split(self.run_student(x_l)), y_l)
            return {"loss": loss, **logs}
        x_u, n = unlabeled["image"], x_l.shape[0]
        # 1. Each network's hard labels of the unmixed images, without gradient (in train
        #    mode, as the release).
        with torch.no_grad():
            weak_left, weak_right = NetworkPair.split(self.run_student(x_u))
            if c.release_passes:
                partner = NetworkPair.split(self.run_student(torch.roll(x_u, -1, dims=0)))
        from_left, from_right = weak_left["logits"].argmax(1), weak_right["logits"].argmax(1)
        # 2. CutMix: images, both label maps and validity pasted with the same masks.
        valid = valid_pixels(unlabeled, x_u)
        b, _, h, w = x_u.shape
        masks = box_masks(
            b, h, w, (c.mix_area_range[0], c.mix_area_range[1]), c.mix_boxes, x_u.device
        )
        if c.release_passes:
            # The partner's labels from its own pass, the mixed then the labelled images.
            x_m, valid_m = paste_from_partner(masks, x_u, valid)
            from_left = torch.where(masks, partner[0]["logits"].argmax(1), from_left)
            from_right = torch.where(masks, partner[1]["logits"].argmax(1), from_right)
            left_u, right_u = NetworkPair.split(self.run_student(x_m))
            left_l, right_l = NetworkPair.split(self.run_student(x_l))
        else:
            x_m, from_left, from_right, valid_m = paste_from_partner(
                masks, x_u, from_left, from_right, valid
            )
            # 3. Both networks on labelled and mixed images in one pass.
            left, right = NetworkPair.split(self.run_student(torch.cat([x_l, x_m])))
            left_l, left_u = split_outputs(left, n)
            right_l, right_u = split_outputs(right, n)
        loss_sup, logs = self.both_supervised(left_l, right_l, y_l)
        # 4. Cross supervision: each network learns the other's labels.
        loss_left = masked_cross_entropy(left_u["logits"], from_right, valid_m, valid_m)
        loss_right = masked_cross_entropy(right_u["logits"], from_left, valid_m, valid_m)
        loss_cps = loss_left + loss_right
        agreement = ((from_left == from_right) & valid_m).sum() / valid_m.sum().clamp(min=1)
        # 5. With a prototypes block (cps+pcr): PCR's branch on the deployed (first)
        #    network's mixed view, learning the labels that network learns: the second's.
        loss_proto, proto_logs = self.prototype_losses(
            PrototypeInputs(
                left_l["features"], left_u["features"], y_l, from_right, valid_m, valid_m
            )
        )
        return {
            "loss": loss_sup + c.cps_weight * loss_cps + loss_proto,
            **logs,
            **proto_logs,
            "loss_cps": loss_cps.detach(),
            "pseudo_label_agreement": agreement.detach(),
        }

    def deployed_network(self) -> nn.Module:
        """The first network, which the release evaluates."""
        return self.student.left  # type: ignore[return-value]


@dataclass
class CPSPCRConfig(PrototypePlugIn, CPSConfig):
    """CPS with PCR's prototype branch plugged in (``cps+pcr``).

    The branch sits on the first network (the deployed one) and learns, on the mixed view,
    the second network's labels of every valid pixel: CPS keeps no confidence threshold.
    """

    name: str = "cps+pcr"


register_method("cps+pcr", CPSPCRConfig)(CPS)
