"""PCR's prototype branch as a part any teacher-student method can attach.

It owns the prototype bank and turns a method's decoder features into the prototype
predictor's losses on labelled pixels and on confident pseudo-labelled pixels (Eqs. 4-10),
moves the bank (Eq. 11), initialises it by k-means after the warm-up (Algorithm 2), and
gives the prototype head that a model file deploys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from protoseg.components.losses import masked_cross_entropy
from protoseg.components.prototypes import (
    PrototypeBank,
    PrototypeSegmenter,
    gather_features,
    prototype_logits_full_res,
    sample_grid_coords,
)
from protoseg.components.pseudo_label import hard_labels
from protoseg.config import WarmupSettings
from protoseg.lifecycle import InitContext
from protoseg.models.registry import register_head

log = logging.getLogger(__name__)

UPDATE_RULES = ("batch_mean", "per_pixel")
PROTOTYPE_HEAD = "prototype"


@dataclass
class PrototypeConfig:
    """The prototype branch's settings (``method.prototypes``)."""

    # M: prototypes per class (the release: 4 on VOC, 3 on Cityscapes).
    per_class: int = 4
    # Eq. 11's EMA factor alpha.
    momentum: float = 0.99
    # Eq. 2's temperature T.
    temperature: float = 0.1
    loss_weight: float = 1.0
    # One random pixel per cell of a grid x grid layout over the input; 0 = every pixel.
    sample_grid: int = 32
    # Table 4 ablations: train the prototype predictor (Eqs. 5, 7); move the bank (Eq. 11).
    train_predictor: bool = True
    update: bool = True
    # "batch_mean": one EMA step per prototype per batch (the release);
    # "per_pixel": Eq. 11 applied pixel by pixel (the paper's reading).
    update_rule: str = "batch_mean"
    init_pixels_per_class: int = 4000
    # Load the initial bank from this file instead of running k-means.
    init_bank: str = ""

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if self.per_class <= 0 or self.temperature <= 0:
            raise ValueError("method.prototypes.per_class and .temperature must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"method.prototypes.momentum={self.momentum} must lie in [0, 1)")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(
                f"method.prototypes.update_rule={self.update_rule!r}: choose one of "
                f"{', '.join(UPDATE_RULES)}"
            )
        if self.sample_grid < 0 or self.init_pixels_per_class <= 0:
            raise ValueError(
                "method.prototypes.sample_grid must be >= 0 and .init_pixels_per_class > 0"
            )


@dataclass
class PrototypePlugIn(WarmupSettings):
    """Mixed into a method's config (first among its bases) to plug PCR's branch in.

    Adds the ``prototypes:`` block and a supervised warm-up (the bank's k-means needs a
    trained student), e.g. ``class FixMatchPCRConfig(PrototypePlugIn, FixMatchConfig)``.
    ``protoseg.methods.common.MethodBase`` builds the branch for any config of this type.
    """

    warmup_epochs: float = 1.0
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    # Table 4 (2) when false: no linear-head losses; the prototype head makes the
    # pseudo-labels and the predictions (for a method whose step supports it: pcr).
    linear_head: bool = True

    def check(self) -> None:
        """Validate the base method's settings, then the prototype block and the switches."""
        super().check()  # type: ignore[misc]
        self.prototypes.check()
        if not self.linear_head and not self.prototypes.train_predictor:
            raise ValueError(
                "method.linear_head and method.prototypes.train_predictor cannot both be false"
            )


@dataclass
class PrototypeInputs:
    """What the prototype branch needs from a method's step.

    ``features_l``/``features_u``: (B, D, h, w) decoder features of the labelled images and
    of the unlabelled view that feeds the branch; ``labels_l``: the labels (B, H, W);
    ``pseudo_labels_u``, ``keep_u``, ``valid_u``: that view's pseudo-labels, its confident
    pixels and its real (not padded) pixels; ``unsup_weight``: the unlabelled term's weight.
    """

    features_l: Tensor
    features_u: Tensor
    labels_l: Tensor
    pseudo_labels_u: Tensor
    keep_u: Tensor
    valid_u: Tensor
    unsup_weight: float = 1.0


class PrototypeBranch(nn.Module):
    """The prototype predictor of a student network's decoder features, and its bank."""

    def __init__(
        self,
        cfg: PrototypeConfig,
        num_classes: int,
        feature_dim: int,
        ignore_index: int = 255,
        linear_head: bool = True,
    ) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.ignore_index = cfg, num_classes, ignore_index
        # Table 4 (2) when False: the prototype head makes the pseudo-labels, the method
        # skips its linear losses and the prototype head is the primary one.
        self.linear_head = linear_head
        self.bank = PrototypeBank(
            num_classes, cfg.per_class, feature_dim, cfg.momentum, cfg.temperature, ignore_index
        )

    @property
    def initialized(self) -> bool:
        """Whether the bank holds its k-means (or loaded) prototypes."""
        return bool(self.bank.initialized)

    def step_losses(self, inputs: PrototypeInputs) -> tuple[Tensor, dict[str, Any]]:
        """The branch's losses and bank update from a step's record: the pseudo-labels
        count only where ``keep_u`` marks them confident."""
        labels = inputs.pseudo_labels_u
        pseudo = torch.where(inputs.keep_u, labels, torch.full_like(labels, self.ignore_index))
        return self.losses(
            inputs.features_l,
            inputs.features_u,
            inputs.labels_l,
            pseudo,
            inputs.valid_u,
            inputs.unsup_weight,
        )

    def pseudo_labels(
        self, teacher_out: dict[str, Tensor], size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Labels and confidences of a teacher's outputs: its linear head's, or (without
        the linear head) the prototype head's on its features."""
        if self.linear_head:
            return hard_labels(teacher_out["logits"])
        return self.pseudo_label(teacher_out["features"], size)

    def losses(
        self,
        features_l: Tensor,
        features_u: Tensor,
        y_l: Tensor,
        pseudo_u: Tensor,
        valid_u: Tensor,
        unsup_weight: float = 1.0,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Prototype CE on labelled and confident unlabelled pixels, and the bank's update.

        ``features_*`` are (B, D, h, w) decoder maps of the labelled and the (mixed)
        unlabelled images; ``y_l`` the labels and ``pseudo_u`` the pseudo-labels at input
        size, ignore_index where not confident; ``valid_u`` marks real unlabelled pixels.
        Only the pixels of one random grid sample enter (the release's 32 x 32 cells).
        """
        cfg = self.cfg
        if not self.initialized:
            raise RuntimeError(
                "the prototype bank is not initialised: call initialize() when the warm-up "
                "ends, before the first semi-supervised step"
            )
        loss = y_l.new_zeros((), dtype=torch.float32)
        logs: dict[str, Any] = {}
        if not cfg.train_predictor and not cfg.update:
            return loss, logs
        size = (int(y_l.shape[-2]), int(y_l.shape[-1]))
        coords = sample_grid_coords(size[0], size[1], cfg.sample_grid, device=y_l.device)
        cy, cx = coords[:, 0], coords[:, 1]
        feats_l = gather_features(features_l, coords, size)  # (B, N, D)
        feats_u = gather_features(features_u, coords, size)
        target_l, target_u = y_l[:, cy, cx], pseudo_u[:, cy, cx]
        dim = feats_l.shape[-1]
        flat_feats = torch.cat([feats_l, feats_u]).reshape(-1, dim)
        flat_targets = torch.cat([target_l, target_u]).reshape(-1)
        sims = self.bank.similarity(flat_feats) if cfg.train_predictor else None
        if sims is not None:
            logits = self.bank.logits_from_similarity(sims)
            n_l = target_l.numel()
            flat_l, flat_u = flat_targets[:n_l], flat_targets[n_l:]
            labelled = flat_l != self.ignore_index
            loss_sup = masked_cross_entropy(logits[:n_l], flat_l, labelled, labelled)
            loss_unsup = masked_cross_entropy(
                logits[n_l:], flat_u, flat_u != self.ignore_index, valid_u[:, cy, cx].reshape(-1)
            )
            loss = loss + cfg.loss_weight * (loss_sup + unsup_weight * loss_unsup)
            logs["loss_proto_sup"] = loss_sup.detach()
            logs["loss_proto_unsup"] = loss_unsup.detach()
        if cfg.update:
            # Moved once per optimiser step (after_optimizer_step), whatever the number of
            # micro-batches: accumulation then takes the same EMA step as more GPUs.
            counts = self.bank.accumulate(
                flat_feats.detach(), flat_targets, similarity=sims, rule=cfg.update_rule
            )
            logs["prototypes_updated"] = (counts > 0).float().mean()
        return loss, logs

    def after_optimizer_step(self) -> None:
        """Apply the update the step's micro-batches accumulated: one EMA step (Eq. 11)."""
        if self.bank.has_pending:
            self.bank.apply_pending()

    @torch.no_grad()
    def pseudo_label(self, features: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Labels and confidences (B, H, W) from the prototype head on a teacher's features,
        classified at full resolution as the release's prototype head does."""
        logits = prototype_logits_full_res(self.bank, features, size)
        conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
        return labels, conf

    def initialize(self, model: nn.Module, context: InitContext) -> None:
        """Algorithm 2: k-means on labelled features (rank 0), or a saved bank; then broadcast."""
        if self.cfg.init_bank:
            self.load_bank(self.cfg.init_bank)
        elif context.labeled_loader is not None:
            feats, labels = collect_class_features(
                model,
                context.labeled_loader,
                context.device,
                self.num_classes,
                self.cfg.init_pixels_per_class,
                self.ignore_index,
                context.seed,
            )
            counts = self.bank.init_kmeans(feats, labels, seed=context.seed)
            log.info(
                "prototype bank initialised by k-means from %s labelled pixels per class", counts
            )
        self.bank.broadcast_(0)

    def load_bank(self, path: str | Path) -> None:
        """Load a (C, M, D) tensor, or a saved bank/state dict, as the initial prototypes."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
            raise ValueError(
                f"{path}: cannot read a prototype bank ({exc}); fix "
                "method.prototypes.init_bank or leave it empty for k-means"
            ) from None
        protos = data.get("prototypes") if isinstance(data, dict) else data
        if not isinstance(protos, Tensor) or protos.shape != self.bank.prototypes.shape:
            got = tuple(protos.shape) if isinstance(protos, Tensor) else type(protos).__name__
            raise ValueError(
                f"{path}: expected prototypes of shape "
                f"{tuple(self.bank.prototypes.shape)}, got {got}"
            )
        if not bool(torch.isfinite(protos).all()):
            raise ValueError(
                f"{path}: the prototype bank holds NaN or infinite values; fix "
                "method.prototypes.init_bank or leave it empty for k-means"
            )
        self.bank.prototypes.copy_(protos)
        self.bank.initialized.fill_(True)

    def head(self, network: nn.Module) -> nn.Module:
        """``network`` with the bank as its classifier (the prototype head)."""
        return PrototypeSegmenter(network, self.bank)

    def deploy_spec(self) -> dict[str, Any]:
        """What a model file stores to rebuild the prototype head (plain data only)."""
        return {
            "kind": PROTOTYPE_HEAD,
            "options": {
                "num_classes": self.bank.num_classes,
                "per_class": self.bank.per_class,
                "dim": self.bank.dim,
                "temperature": self.bank.temperature,
            },
            "state": {k: v.detach().cpu() for k, v in self.bank.state_dict().items()},
        }


@register_head(PROTOTYPE_HEAD)
def build_prototype_head(network: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Rebuild a deployed prototype head from ``deploy_spec()`` output around ``network``."""
    opts = spec["options"]
    bank = PrototypeBank(
        int(opts["num_classes"]),
        int(opts["per_class"]),
        int(opts["dim"]),
        temperature=float(opts["temperature"]),
    )
    bank.load_state_dict(spec["state"])
    return PrototypeSegmenter(network, bank)


@torch.no_grad()
def collect_class_features(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    num_classes: int,
    per_class: int,
    ignore_index: int = 255,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Features of randomly sampled labelled pixels, at most ``per_class`` per class.

    Each image contributes up to a fair share per class, so that a few large images do
    not dominate; features are read at full resolution as in Algorithm 2 (bilinear
    upsampling of the stride-4 map), without materialising the upsampled map.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    num_images = max(len(loader), 1) if isinstance(loader, Sized) else 1
    share = max(8, math.ceil(2 * per_class / num_images))
    chunks: list[tuple[Tensor, Tensor]] = []
    for batch in loader:
        image = batch["image"].to(device)
        mask = batch["mask"].cpu()  # pixel picking runs on the CPU, whatever the device
        feats = model(image)["features"].float()
        for b in range(image.shape[0]):
            target = mask[b]
            picks = []
            for c in torch.unique(target).tolist():
                if c == ignore_index or not 0 <= c < num_classes:
                    continue
                where = (target == c).nonzero()
                order = torch.randperm(where.shape[0], generator=gen)[:share]
                picks.append(where[order])
            if not picks:
                continue
            coords = torch.cat(picks)
            sampled = gather_features(feats[b : b + 1], coords.to(device), tuple(target.shape))[0]
            chunks.append((sampled.cpu(), target[coords[:, 0], coords[:, 1]]))
    model.train(was_training)
    if not chunks:
        raise ValueError(
            "no labelled pixels found to initialise the prototypes: check the "
            "labelled split and data.num_classes"
        )
    feats = torch.cat([f for f, _ in chunks])
    labels = torch.cat([lab for _, lab in chunks])
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0]
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    keep_idx = torch.cat(keep)
    return feats[keep_idx], labels[keep_idx]
