"""PCR: prototype-based consistency regularisation (Xu et al., NeurIPS 2022).

CutMix-Seg plus a prototype predictor on the student's 512-d decoder features, trained on
labelled pixels and on confident teacher pseudo-labels of the mixed view (Eqs. 4-10), with a
bank initialised by k-means after the warm-up (Alg. 2) and moved by EMA (Eq. 11).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import Config
from protoseg.methods.base import Batch, WarmupContext
from protoseg.methods.cutmix_seg import CutMixSeg
from protoseg.methods.losses import masked_cross_entropy
from protoseg.prototypes import (
    PrototypeBank,
    PrototypeSegmenter,
    gather_features,
    sample_grid_coords,
)

log = logging.getLogger(__name__)


class PCR(CutMixSeg):
    """The paper's method; ablation switches in ``cfg.method`` give Table 4's variants."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(model, cfg)
        m = cfg.method
        self.bank = PrototypeBank(
            cfg.data.num_classes,
            m.prototypes_per_class,
            model.feature_dim,
            m.prototype_momentum,
            m.temperature,
            cfg.data.ignore_index,
        )

    @property
    def find_unused_parameters(self) -> bool:
        """Without the linear loss the classifier (and aux head) get no gradient."""
        return not self.method_cfg.linear_head

    @property
    def heads(self) -> tuple[str, ...]:
        """Linear and prototype predictions."""
        return ("linear", "prototype")

    def inference_model(self, head: str = "linear") -> nn.Module:
        """The teacher with its linear head, or with the prototype bank as classifier."""
        if head == "prototype":
            return PrototypeSegmenter(self.teacher, self.bank)
        return super().inference_model(head)

    # ---- pseudo-labels -----------------------------------------------------------------------
    def pseudo_label(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """From the teacher's linear head, or its prototype head in ablation (2)."""
        if self.method_cfg.linear_head:
            return super().pseudo_label(images)
        out = self.teacher_forward(images)
        with torch.no_grad():
            logits = F.interpolate(
                self.bank.logits(out["features"]),
                size=images.shape[-2:],
                mode="bilinear",
                align_corners=True,
            )
        conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
        return labels, conf

    # ---- losses ----------------------------------------------------------------------------------
    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> dict[str, Any]:
        """CutMix-Seg's step with the prototype branch added after warm-up."""
        if not self.in_warmup(step) and not bool(self.bank.initialized):
            raise RuntimeError(
                "PCR's prototype bank is not initialised: the engine must call "
                "on_warmup_end before the first semi-supervised step"
            )
        return super().training_step(labeled, unlabeled, step)

    def unlabeled_losses(
        self, out_l: dict, out_u: dict, y_l: Tensor, y_m: Tensor, keep: Tensor, valid_m: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """Eqs. 4-10: linear and prototype CE on labelled and confident mixed pixels."""
        m = self.method_cfg
        logs: dict[str, Any] = {}
        loss = y_l.new_zeros((), dtype=torch.float32)
        if m.linear_head:
            loss, logs = super().unlabeled_losses(out_l, out_u, y_l, y_m, keep, valid_m)
        if not m.proto_head and not m.update_prototypes:
            return loss, logs
        size = tuple(y_l.shape[-2:])
        coords = sample_grid_coords(size[0], size[1], m.sample_grid, device=y_l.device)
        cy, cx = coords[:, 0], coords[:, 1]
        feats_l = gather_features(out_l["features"], coords, size)  # (B, N, D)
        feats_u = gather_features(out_u["features"], coords, size)
        target_l = y_l[:, cy, cx]
        pseudo = torch.where(keep, y_m, torch.full_like(y_m, self.ignore_index))
        target_u = pseudo[:, cy, cx]
        dim = feats_l.shape[-1]
        flat_feats = torch.cat([feats_l, feats_u]).reshape(-1, dim)
        flat_targets = torch.cat([target_l, target_u]).reshape(-1)
        sims = self.bank.similarity(flat_feats) if m.proto_head else None
        if m.proto_head:
            logits = self.bank.logits_from_similarity(sims)
            n_l = target_l.numel()
            flat_l, flat_u = flat_targets[:n_l], flat_targets[n_l:]
            loss_proto_sup = masked_cross_entropy(
                logits[:n_l], flat_l, flat_l != self.ignore_index, flat_l != self.ignore_index
            )
            loss_proto_unsup = masked_cross_entropy(
                logits[n_l:], flat_u, flat_u != self.ignore_index, valid_m[:, cy, cx].reshape(-1)
            )
            loss = loss + m.proto_loss_weight * (loss_proto_sup + m.unsup_weight * loss_proto_unsup)
            logs["loss_proto_sup"] = loss_proto_sup.detach()
            logs["loss_proto_unsup"] = loss_proto_unsup.detach()
        if m.update_prototypes:
            counts = self.bank.update(
                flat_feats.detach(), flat_targets, m.update_rule, similarity=sims
            )
            logs["prototypes_updated"] = float((counts > 0).float().mean())
        return loss, logs

    # ---- initialisation --------------------------------------------------------------------------
    def needs_warmup_hook(self) -> bool:
        """The bank still needs its k-means initialisation."""
        return not bool(self.bank.initialized)

    def on_warmup_end(self, context: WarmupContext) -> None:
        """Algorithm 2: k-means on labelled features (rank 0), or a saved bank; then broadcast."""
        if self.method_cfg.init_bank:
            self.load_bank(self.method_cfg.init_bank)
        elif context.labeled_loader is not None:
            feats, labels = collect_class_features(
                self.model,
                context.labeled_loader,
                context.device,
                self.num_classes,
                self.method_cfg.init_pixels_per_class,
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
        except (OSError, RuntimeError) as exc:
            raise ValueError(
                f"{path}: cannot read a prototype bank ({exc}); fix "
                "method.init_bank or leave it empty for k-means"
            ) from None
        protos = data.get("prototypes") if isinstance(data, dict) else data
        if not isinstance(protos, Tensor) or protos.shape != self.bank.prototypes.shape:
            got = tuple(protos.shape) if isinstance(protos, Tensor) else type(protos).__name__
            raise ValueError(
                f"{path}: expected prototypes of shape "
                f"{tuple(self.bank.prototypes.shape)}, got {got}"
            )
        self.bank.prototypes.copy_(protos)
        self.bank.initialized.fill_(True)


@torch.no_grad()
def collect_class_features(
    model: nn.Module,
    loader,
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
    num_images = max(len(loader), 1) if hasattr(loader, "__len__") else 1
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
