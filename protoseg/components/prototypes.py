"""The prototype bank of PCR: cosine-similarity logits (Eq. 2), EMA update (Eq. 11), k-means init.

The bank is a (C, M, D) buffer, never trained by gradient. Similarities and updates run in
fp32 whatever the autocast context, and updates are summed across processes before the
mean, so every rank holds the same bank.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _all_reduce_(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class PrototypeBank(nn.Module):
    """C classes x M prototypes x D dims, used as a nearest-prototype classifier."""

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        dim: int,
        momentum: float = 0.99,
        temperature: float = 0.1,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.num_classes, self.per_class, self.dim = num_classes, per_class, dim
        self.momentum, self.temperature, self.ignore_index = momentum, temperature, ignore_index
        self.register_buffer("prototypes", torch.zeros(num_classes, per_class, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ---- prediction (Eq. 2) -------------------------------------------------------------
    def similarity(self, features: Tensor) -> Tensor:
        """Cosine similarity of (N, D) features to every prototype: (N, C, M), in fp32."""
        # fp32 even under autocast: bf16 cosines near 1 lose the margin between prototypes.
        with torch.autocast(features.device.type, enabled=False):
            feats = features.float()
            protos = F.normalize(self.prototypes.float(), dim=2).reshape(-1, self.dim)
            # Dividing the (N, C*M) products by |x| is the same as normalising the (N, D)
            # features first, at a fraction of the cost (and of the backward's).
            norms = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sims = (feats @ protos.T) / norms
        return sims.view(-1, self.num_classes, self.per_class)

    def logits(self, features: Tensor) -> Tensor:
        """Class logits max_m cos(x, p_cm) / T for (N, D) or (B, D, H, W) features."""
        if features.dim() == 4:
            b, d, h, w = features.shape
            flat = features.permute(0, 2, 3, 1).reshape(-1, d)
            return self.logits(flat).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be (N, {self.dim}) or (B, {self.dim}, H, W), "
                f"got {tuple(features.shape)}"
            )
        return self.logits_from_similarity(self.similarity(features))

    def logits_from_similarity(self, similarity: Tensor) -> Tensor:
        """Eq. 2's logits from (N, C, M) cosine similarities: max over M, divided by T."""
        return similarity.amax(dim=2) / self.temperature

    # ---- update (Eq. 11) ----------------------------------------------------------------
    @torch.no_grad()
    def assign(
        self, features: Tensor, labels: Tensor, similarity: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Each labelled feature's own-class nearest prototype: (features, class, slot).

        ``similarity`` (N, C, M) may be passed when the caller already computed it against
        the current bank (PCR's loss does), which saves the largest cost of an update.
        """
        keep = labels != self.ignore_index
        feats, cls = features.float()[keep], labels[keep].long()
        if not cls.numel():
            return feats, cls, cls
        sims = self.similarity(feats) if similarity is None else similarity.detach()[keep]
        own = sims[torch.arange(cls.numel(), device=cls.device), cls]  # (N, M)
        return feats, cls, own.argmax(dim=1)

    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        rule: str = "batch_mean",
        similarity: Tensor | None = None,
    ) -> Tensor:
        """Move each prototype towards the raw features assigned to it; returns pixel counts.

        ``batch_mean`` (the release): p <- a p + (1 - a) mean(assigned), one step per batch.
        ``per_pixel`` (the paper's Eq. 11 read literally): the same step once per pixel, in
        order, which in closed form is p <- a^n p + (1 - a) sum_k a^(n-1-k) x_k.
        Sums and counts are all-reduced first, so every process ends with the same bank.
        """
        feats, cls, slot = self.assign(features, labels, similarity)
        flat = cls * self.per_class + slot
        n_slots = self.num_classes * self.per_class
        a = self.momentum
        if rule == "batch_mean":
            weights = torch.ones_like(flat, dtype=torch.float32)
        elif rule == "per_pixel":
            # Later pixels weigh more: weight a^(number of later pixels in the same slot).
            later = _count_later_in_slot(flat, n_slots)
            weights = a ** later.float()
        else:
            raise ValueError(f"unknown update rule {rule!r}: use batch_mean or per_pixel")
        sums = torch.zeros(n_slots, self.dim, device=feats.device)
        sums.index_add_(0, flat, feats * weights[:, None])
        counts = torch.zeros(n_slots, device=feats.device)
        counts.index_add_(0, flat, torch.ones_like(weights))
        packed = _all_reduce_(torch.cat([sums, counts[:, None]], dim=1))
        sums, counts = packed[:, :-1], packed[:, -1]
        protos = self.prototypes.view(n_slots, self.dim)
        hit = counts > 0
        if rule == "batch_mean":
            mean = sums[hit] / counts[hit, None]
            protos[hit] = a * protos[hit] + (1 - a) * mean.to(protos.dtype)
        else:
            decay = (a ** counts[hit])[:, None]
            protos[hit] = decay * protos[hit] + (1 - a) * sums[hit].to(protos.dtype)
        return counts.view(self.num_classes, self.per_class)

    # ---- initialisation (Algorithm 2) -----------------------------------------------------
    @torch.no_grad()
    def init_kmeans(self, features: Tensor, labels: Tensor, seed: int = 0) -> dict[int, int]:
        """Set each class's prototypes to k-means centres of its features; returns pixel counts.

        A class with fewer distinct pixels than M gets as many clusters as it has and repeats
        them; a class with no pixels keeps a random direction and is logged, so that the bank
        is usable and later updates can still move it.
        """
        feats = features.float().cpu()
        labels = labels.cpu()
        counts: dict[int, int] = {}
        gen = torch.Generator().manual_seed(seed)
        bank = torch.empty(self.num_classes, self.per_class, self.dim)
        for c in range(self.num_classes):
            x = feats[labels == c].numpy().astype(np.float64)
            counts[c] = len(x)
            if len(x) == 0:
                log.warning("prototype init: class %d has no labelled pixels; random prototypes", c)
                bank[c] = torch.randn(self.per_class, self.dim, generator=gen)
                continue
            k = min(self.per_class, len(np.unique(x, axis=0)))
            if k < self.per_class:
                log.warning(
                    "prototype init: class %d has only %d distinct pixels; %d of %d "
                    "prototypes are duplicates",
                    c,
                    k,
                    self.per_class - k,
                    self.per_class,
                )
            centres = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).cluster_centers_
            centres = torch.from_numpy(centres).float()
            bank[c] = centres[torch.arange(self.per_class) % k]
        self.prototypes.copy_(bank.to(self.prototypes.device))
        self.initialized.fill_(True)
        return counts

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Copy rank ``src``'s bank to every process (after a rank-0 initialisation)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.prototypes, src)
            dist.broadcast(self.initialized, src)

    def extra_repr(self) -> str:
        """Sizes and hyper-parameters for print(model)."""
        return (
            f"classes={self.num_classes}, per_class={self.per_class}, dim={self.dim}, "
            f"momentum={self.momentum}, temperature={self.temperature}"
        )


class PrototypeSegmenter(nn.Module):
    """A segmentation network whose logits come from a prototype bank instead of its head."""

    def __init__(self, network: nn.Module, bank: PrototypeBank) -> None:
        super().__init__()
        self.network, self.bank = network, bank

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Prototype logits (Eq. 2) upsampled to the input size, plus the features."""
        out = self.network(images)
        logits = F.interpolate(
            self.bank.logits(out["features"]),
            size=images.shape[-2:],
            mode="bilinear",
            align_corners=True,
        )
        return {"logits": logits, "features": out["features"]}


def _count_later_in_slot(slots: Tensor, n_slots: int) -> Tensor:
    """For each element, how many elements after it share its slot."""
    # Stable sort by slot keeps the original order inside each slot.
    sorted_slots, perm = torch.sort(slots, stable=True)
    totals = torch.bincount(sorted_slots, minlength=n_slots)
    starts = torch.cumsum(totals, 0) - totals
    rank_in_slot = torch.arange(slots.numel(), device=slots.device) - starts[sorted_slots]
    later_sorted = totals[sorted_slots] - 1 - rank_in_slot
    later = torch.empty_like(later_sorted)
    later[perm] = later_sorted
    return later


def sample_grid_coords(
    height: int,
    width: int,
    grid: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One random pixel per cell of a grid x grid layout over an H x W image: (N, 2) as (y, x).

    ``grid=0`` returns every pixel. Cells are as even as integer bounds allow; an image
    smaller than the grid gets one pixel per row/column.
    """
    if grid <= 0:
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).to(device)
    gy, gx = min(grid, height), min(grid, width)
    y_edges = torch.linspace(0, height, gy + 1).floor().long()
    x_edges = torch.linspace(0, width, gx + 1).floor().long()
    cell_h = (y_edges[1:] - y_edges[:-1])[:, None]
    cell_w = (x_edges[1:] - x_edges[:-1])[None, :]
    cy = y_edges[:-1, None] + (torch.rand(gy, gx, generator=generator) * cell_h).long()
    cx = x_edges[None, :-1] + (torch.rand(gy, gx, generator=generator) * cell_w).long()
    coords = torch.stack([cy.reshape(-1), cx.reshape(-1)], dim=1)
    return coords.to(device)


def gather_features(features: Tensor, coords: Tensor, size: tuple[int, int]) -> Tensor:
    """Features of a (B, D, h, w) map at input-resolution pixels ``coords`` (N, 2) -> (B, N, D).

    Equal to bilinearly upsampling the map to ``size`` with align_corners=True and picking
    the pixels, without materialising the (B, D, H, W) tensor.
    """
    height, width = size
    y = coords[:, 0].to(features.dtype)
    x = coords[:, 1].to(features.dtype)
    gx = 2 * x / max(width - 1, 1) - 1
    gy = 2 * y / max(height - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=1)[None, :, None, :].expand(features.shape[0], -1, -1, -1)
    sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=True)  # (B, D, N, 1)
    return sampled[..., 0].transpose(1, 2)
