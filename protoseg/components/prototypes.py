"""The prototype bank of PCR: cosine-similarity logits (Eq. 2), EMA update (Eq. 11), k-means init.

The bank is a (C, M, D) buffer, never trained by gradient. Similarities and updates run in
fp32 whatever the autocast context, and updates are summed across processes before the
EMA step, so every rank holds the same bank.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

log = logging.getLogger(__name__)

UPDATE_RULES = ("batch_mean", "per_pixel")


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_(tensor: Tensor) -> Tensor:
    if _world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _all_gather(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` stacked in rank order: (world, *shape)."""
    world = _world_size()
    if world == 1:
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value in Python waits for nothing (a CPU tensor)."""
    return device.type == "cpu"


class PrototypeBank(nn.Module):
    """C classes x M prototypes x D dims, used as a nearest-prototype classifier.

    Labels outside [0, C) (``ignore_index`` among them) are ignored by every update; they
    are masked rather than checked, because a check would cost a host sync per step.
    """

    # Buffers (registered in __init__), declared for type checkers.
    prototypes: Tensor
    initialized: Tensor
    _pending_sums: Tensor
    _pending_counts: Tensor

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
        # accumulate()'s running sums and counts, one row per slot c * M + m. Not persistent:
        # they are empty whenever a checkpoint is written (after an optimiser step, so after
        # apply_pending), and buffers follow .to(device) like the prototypes.
        slots = num_classes * per_class
        self.register_buffer("_pending_sums", torch.zeros(slots, dim), persistent=False)
        self.register_buffer("_pending_counts", torch.zeros(slots), persistent=False)
        self._pending_rule: str | None = None

    @property
    def num_slots(self) -> int:
        """Number of prototypes, C * M; slot c * M + m is prototype m of class c."""
        return self.num_classes * self.per_class

    @property
    def has_pending(self) -> bool:
        """Whether accumulate() was called since the last apply_pending()."""
        return self._pending_rule is not None

    # ---- prediction (Eq. 2) -------------------------------------------------------------
    def normalized_prototypes(self) -> Tensor:
        """The prototypes as unit vectors, (C * M, D) in fp32, row c * M + m."""
        return F.normalize(self.prototypes.float(), dim=2).reshape(-1, self.dim)

    def similarity(self, features: Tensor) -> Tensor:
        """Cosine similarity of (N, D) features to every prototype: (N, C, M), in fp32."""
        # fp32 even under autocast: bf16 cosines near 1 lose the margin between prototypes.
        with torch.autocast(features.device.type, enabled=False):
            feats = features.float()
            # Dividing the (N, C*M) products by |x| is the same as normalising the (N, D)
            # features first, at a fraction of the cost (and of the backward's).
            norms = torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(1e-12)
            sims = (feats @ self.normalized_prototypes().T) / norms
        return sims.view(-1, self.num_classes, self.per_class)

    def logits(self, features: Tensor) -> Tensor:
        """Class logits max_m cos(x, p_cm) / T for (N, D) or (B, D, H, W) features.

        A feature map is classified at its own resolution; for the release's prediction at
        the input resolution use :func:`prototype_logits_full_res`.
        """
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
        n, c, m = similarity.shape
        if similarity.requires_grad:
            # With a gradient to keep, max_pool1d runs its with-indices kernel, slower on
            # the CPU (forward and backward) than max over dim 2: same values, same gradient.
            return similarity.max(dim=2).values / self.temperature
        # Without one, max_pool1d over windows of M is several times faster on the CPU than
        # any reduction over a last dimension of 3 or 4; equal values.
        best = F.max_pool1d(similarity.reshape(n, 1, c * m), m)
        return best.view(n, c) / self.temperature

    # ---- update (Eq. 11) ----------------------------------------------------------------
    @torch.no_grad()
    def slots(self, features: Tensor, labels: Tensor, similarity: Tensor | None = None) -> Tensor:
        """Each feature's own-class nearest prototype as a slot c * M + m; C * M if ignored.

        Shapes stay (N,) whatever the labels, so nothing waits for the device. The nearest
        prototype maximises x . p_cm / |p_cm|, the cosine up to the factor |x| that is the
        same for all M candidates, so |x| is never computed. ``similarity`` (N, C, M) may be
        passed when the caller already computed it against the current bank (PCR's loss
        does); then only its own-class entries are read.
        """
        labels = labels.reshape(-1)
        valid = (labels >= 0) & (labels < self.num_classes) & (labels != self.ignore_index)
        cls = torch.where(valid, labels, 0).long()
        n, m = cls.numel(), self.per_class
        if similarity is None:
            with torch.autocast(features.device.type, enabled=False):
                # All C * M products: on CPU they measured cheaper than gathering each
                # pixel's own M prototypes (an (N, M, D) copy) or a loop over classes.
                products = features.float() @ self.normalized_prototypes().T
            similarity = products.view(n, self.num_classes, m)
        # Row i * C + class of the (N * C, M) view: each pixel's own M, copied row by row
        # (cheaper than gather with an expanded index, and no boolean mask).
        rows = torch.arange(n, device=cls.device) * self.num_classes + cls
        own = similarity.detach().reshape(n * self.num_classes, m).index_select(0, rows)
        slot = cls * m + own.argmax(dim=1)
        return torch.where(valid, slot, self.num_slots)

    @torch.no_grad()
    def assign(
        self, features: Tensor, labels: Tensor, similarity: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Each labelled feature's own-class nearest prototype: (features, class, slot).

        The labelled pixels only, in order (a data-dependent shape: the update itself uses
        :meth:`slots`, which keeps every pixel). ``similarity`` as in :meth:`slots`.
        """
        flat = self.slots(features, labels, similarity)
        keep = flat < self.num_slots
        flat = flat[keep]
        return features.float()[keep], flat // self.per_class, flat % self.per_class

    @torch.no_grad()
    def accumulate(
        self,
        features: Tensor,
        labels: Tensor,
        similarity: Tensor | None = None,
        rule: str = "batch_mean",
    ) -> Tensor:
        """Add one micro-batch to the pending update, without moving the bank; returns this
        micro-batch's (C, M) pixel counts per prototype.

        Pixels are assigned against the bank as it is now, which does not move until
        :meth:`apply_pending`: a step split into micro-batches (gradient accumulation)
        assigns and averages exactly as one call on the whole batch would. Pending sums are
        not part of the state dict: call apply_pending before saving (checkpoints are taken
        after optimiser steps, when nothing is pending). For ``per_pixel``, micro-batches
        count in call order, the pixels of a later call coming after those of an earlier
        one. Every call between two apply_pending calls must use the same rule.
        """
        if rule not in UPDATE_RULES:
            raise ValueError(f"unknown update rule {rule!r}: use batch_mean or per_pixel")
        if self._pending_rule not in (None, rule):
            raise ValueError(
                f"accumulate(rule={rule!r}) while a {self._pending_rule!r} update is pending: "
                "call apply_pending() first"
            )
        flat = self.slots(features, labels, similarity)
        feats = features.detach().float().reshape(flat.numel(), self.dim)
        sums, counts = self._slot_sums(feats, flat, rule)
        if rule == "per_pixel":
            # What was pending came before these pixels: it decays once per pixel added.
            self._pending_sums.mul_((self.momentum**counts)[:, None])
        self._pending_sums.add_(sums)
        self._pending_counts.add_(counts)
        self._pending_rule = rule
        return counts.view(self.num_classes, self.per_class)

    def _slot_sums(self, feats: Tensor, flat: Tensor, rule: str) -> tuple[Tensor, Tensor]:
        """Per-slot sums (C * M, D) and counts of (N, D) features in slots ``flat``.

        ``per_pixel`` weighs the pixel with k later pixels in its slot by a^k (Eq. 11 once
        per pixel in order, in closed form). One embedding_bag over the features sorted by
        slot: a segment sum that reads each row once, where index_add_ runs a scatter
        (slower on CPU), and the sort makes the counts and "later" ranks come without a
        host sync. Ignored pixels (slot C * M) sort last.
        """
        slots = self.num_slots
        sorted_slots, order = torch.sort(flat, stable=True)  # stable: pixel order kept
        bounds = torch.searchsorted(sorted_slots, torch.arange(slots + 2, device=flat.device))
        counts = (bounds[1 : slots + 1] - bounds[:slots]).float()
        weights = None
        if rule == "per_pixel":
            position = torch.arange(flat.numel(), device=flat.device)
            later = bounds.index_select(0, sorted_slots + 1) - 1 - position
            weights = self.momentum ** later.float()
        if _host_reads_are_free(flat.device):
            # Reading the number of labelled pixels then waits for nothing, and the ignored
            # pixels' rows are left unread (often half of them: unconfident pseudo-labels).
            used = int(bounds[slots])
            order = order[:used]
            weights = None if weights is None else weights[:used]
            offsets = bounds[:slots]
        else:
            # An accelerator keeps the shapes fixed: the ignored pixels make one more bag.
            offsets = bounds[: slots + 1]
        sums = F.embedding_bag(order, feats, offsets, mode="sum", per_sample_weights=weights)
        return sums[:slots], counts

    @torch.no_grad()
    def apply_pending(self) -> Tensor:
        """Sum the pending update over processes, take one EMA step, clear; returns (C, M) counts.

        One collective per call: an all-reduce of sums and counts for ``batch_mean``; for
        ``per_pixel`` an all-gather, because the closed form needs each rank's counts to
        weigh the ranks after it. Across ranks, pixels count in rank order: all of rank 0's
        micro-batches, then rank 1's, and so on, as if the ranks' batches were concatenated.
        Every rank must call it (also with nothing pending) and use the same rule.
        """
        rule = self._pending_rule or "batch_mean"
        n, a = self.num_slots, self.momentum
        packed = torch.cat([self._pending_sums, self._pending_counts[:, None]], dim=1)
        if rule == "batch_mean":
            packed = _all_reduce_(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        else:
            ranks = _all_gather(packed)  # (world, n, D + 1)
            rank_counts = ranks[:, :, -1]
            # Pixels on later ranks come after this rank's: its sums decay once per each.
            after = rank_counts.flip(0).cumsum(0).flip(0) - rank_counts
            sums = ((a**after)[:, :, None] * ranks[:, :, :-1]).sum(0)
            counts = rank_counts.sum(0)
        protos = self.prototypes.view(n, self.dim)
        if rule == "batch_mean":
            mean = sums / counts.clamp_min(1)[:, None]
            moved = a * protos + (1 - a) * mean.to(protos.dtype)
        else:
            moved = (a**counts)[:, None] * protos + (1 - a) * sums.to(protos.dtype)
        # torch.where instead of indexing with counts > 0: no data-dependent shape, no sync.
        protos.copy_(torch.where((counts > 0)[:, None], moved, protos))
        self._pending_sums.zero_()
        self._pending_counts.zero_()
        self._pending_rule = None
        return counts.view(self.num_classes, self.per_class)

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
        Sums and counts are reduced over processes first, so every process ends with the
        same bank. This is :meth:`accumulate` then :meth:`apply_pending`, so anything
        accumulated before is applied in the same step.
        """
        self.accumulate(features, labels, similarity, rule)
        return self.apply_pending()

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        # Pending sums are not saved; saving while some are pending loses them on resume.
        if self.has_pending:
            warnings.warn(
                "PrototypeBank saved with an update pending (accumulate() without "
                "apply_pending()): the pending pixels are not in the checkpoint",
                RuntimeWarning,
                stacklevel=3,
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

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
            # One OpenMP thread: scikit-learn's k-means sums in per-thread chunks, so its
            # centres (and the whole run after them) would depend on the machine's core count.
            with threadpool_limits(limits=1, user_api="openmp"):
                kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
            centres = kmeans.cluster_centers_
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
    """A segmentation network whose logits come from a prototype bank instead of its head.

    As in the release, the features are upsampled to the input size and every pixel is
    classified (not the other way round); see :func:`prototype_logits_full_res`.
    """

    def __init__(self, network: nn.Module, bank: PrototypeBank, rows_per_chunk: int = 64) -> None:
        super().__init__()
        self.network, self.bank, self.rows_per_chunk = network, bank, rows_per_chunk

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Prototype logits (Eq. 2) of the features upsampled to the input size; the features."""
        out = self.network(images)
        size = (images.shape[-2], images.shape[-1])
        logits = prototype_logits_full_res(self.bank, out["features"], size, self.rows_per_chunk)
        return {"logits": logits, "features": out["features"]}


def _bilinear_taps(positions: Tensor, out_size: int, in_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source taps of align_corners=True bilinear resizing from ``in_size`` to ``out_size``.

    For output positions (integers) returns (i0, i1, w) with value = (1 - w) x[i0] + w x[i1],
    w in [0, 1], the source coordinate computed in fp32 as F.interpolate computes it.
    """
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = positions.float() * scale
    # i0 stops one short of the end so that i1 = i0 + 1 stays in range: the last position
    # gets w = 1 on the last sample instead of w = 0 on a repeated one, the same value.
    i0 = src.floor().long().clamp(0, max(in_size - 2, 0))
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0).clamp(0, 1)


def _neighbour_gram(features: Tensor) -> Tensor:
    """Dot products of each pixel with the neighbours that bilinear interpolation mixes.

    From (B, D, h, w) features returns (B, 5, h, w): |f(y,x)|^2, f(y,x).f(y,x+1),
    f(y,x).f(y+1,x), f(y,x).f(y+1,x+1) and f(y,x+1).f(y+1,x). Pairs that run off the map
    are 0; interpolation gives them weight 0.
    """
    f = features
    b, _, h, w = f.shape
    gram = f.new_zeros(b, 5, h, w)
    gram[:, 0] = (f * f).sum(1)
    gram[:, 1, :, :-1] = (f[..., :-1] * f[..., 1:]).sum(1)
    gram[:, 2, :-1] = (f[:, :, :-1] * f[:, :, 1:]).sum(1)
    gram[:, 3, :-1, :-1] = (f[:, :, :-1, :-1] * f[:, :, 1:, 1:]).sum(1)
    gram[:, 4, :-1, :-1] = (f[:, :, :-1, 1:] * f[:, :, 1:, :-1]).sum(1)
    return gram


def prototype_logits_full_res(
    bank: PrototypeBank, features: Tensor, size: tuple[int, int], rows_per_chunk: int = 64
) -> Tensor:
    """The release's prototype head: upsample (B, D, h, w) features to ``size``, classify pixels.

    Equal (to fp32 rounding) to bilinearly upsampling the features with align_corners=True
    and taking Eq. 2's logits of every pixel, without the (B, D, H, W) map. Upsampling is
    linear, so a pixel's dot products with the prototypes are the upsampled low-resolution
    dot products; its squared norm is not linear but is the quadratic form of its four
    source pixels' weights with their pairwise dot products (:func:`_neighbour_gram`).
    Both are interpolated along x once, at the source rows, then along y for
    ``rows_per_chunk`` output rows at a time.

    Memory bound, in fp32 elements, with K = C * M and R = rows_per_chunk: the B * C * H * W
    logits; B * D * h * w for one temporary and B * (K + 5) * h * w while the
    low-resolution products are computed; B * (K + 12) * h * W while they are interpolated
    along x; about 4 * B * K * R * W per chunk. No tensor has D * H * W elements (for a
    stride-4 map, nothing but the logits is larger than a quarter of B * K * H * W).
    Returns fp32 logits whatever the autocast context.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    b, d, h, w = features.shape
    if d != bank.dim:
        raise ValueError(f"features must be (B, {bank.dim}, h, w), got {tuple(features.shape)}")
    height, width = size
    c, m = bank.num_classes, bank.per_class
    k = c * m
    device = features.device
    with torch.autocast(device.type, enabled=False):
        f = features.float()
        dots = bank.normalized_prototypes() @ f.reshape(b, d, h * w)  # (B, K, h * w)
        gram = _neighbour_gram(f)
        # Along x, at the h source rows (F.interpolate in 1-D is the same interpolation).
        dots_x = F.interpolate(dots.view(b, k * h, w), width, mode="linear", align_corners=True)
        dots_x = dots_x.view(b, k, h, width)
        del f, dots
        x0, x1, wx = _bilinear_taps(torch.arange(width, device=device), width, w)
        ux = 1 - wx
        g0, g1 = gram.index_select(3, x0), gram.index_select(3, x1)  # (B, 5, h, W)
        # For each source row y: |ux f(y,x0) + wx f(y,x1)|^2, and the dot product of that
        # interpolated feature with row y + 1's.
        sq_row = ux * ux * g0[:, 0] + wx * wx * g1[:, 0] + 2 * ux * wx * g0[:, 1]
        cross = ux * ux * g0[:, 2] + wx * wx * g1[:, 2] + ux * wx * (g0[:, 3] + g0[:, 4])
        del gram, g0, g1
        all_y0, all_y1, all_wy = _bilinear_taps(torch.arange(height, device=device), height, h)
        out = torch.empty(b, c, height, width, device=device)
        for r0 in range(0, height, rows_per_chunk):
            rows = slice(r0, min(r0 + rows_per_chunk, height))
            y0, y1, wy = all_y0[rows], all_y1[rows], all_wy[rows, None]
            uy = 1 - wy
            num = dots_x.index_select(2, y0) * uy + dots_x.index_select(2, y1) * wy
            sq = uy * uy * sq_row.index_select(1, y0) + wy * wy * sq_row.index_select(1, y1)
            sq = sq + 2 * uy * wy * cross.index_select(1, y0)
            # clamp_min(0): rounding can leave a near-zero square slightly negative.
            norm = sq.clamp_min(0).sqrt().clamp_min(1e-12)  # F.normalize's eps
            sims = (num / norm[:, None]).view(b, c, m, -1, width)
            out[:, :, rows] = sims.amax(2) / bank.temperature
    return out


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


def gather_features(
    features: Tensor, coords: Tensor, size: tuple[int, int], corner_gather: bool | None = None
) -> Tensor:
    """Features of a (B, D, h, w) map at input-resolution pixels ``coords`` (N, 2) -> (B, N, D).

    Equal to bilinearly upsampling the map to ``size`` with align_corners=True and picking
    the pixels, without materialising the (B, D, H, W) tensor. The result is fp32 and
    gradients flow to ``features``. On an accelerator a bf16 or fp16 map (under autocast)
    is read in its own dtype: only the four source pixels of each pick are cast, where
    grid_sample would run on an fp32 copy of the whole map (and a low-precision grid would
    misplace the picks). On the CPU the fp32 copy and grid_sample are the faster path.
    ``corner_gather`` forces one path (True: read the corners in the map's dtype); None
    chooses as above.
    """
    height, width = size
    b, d, h, w = features.shape
    if corner_gather is None:
        corner_gather = features.dtype != torch.float32 and features.device.type != "cpu"
    if not corner_gather:
        # grid_sample is the fastest exact path on CPU (several times faster than gathering
        # the corners there, even after casting a low-precision map to fp32), and an fp32
        # map needs no copy.
        features = features.float()
        y = coords[:, 0].float()
        x = coords[:, 1].float()
        gx = 2 * x / max(width - 1, 1) - 1
        gy = 2 * y / max(height - 1, 1) - 1
        grid = torch.stack([gx, gy], dim=1)[None, :, None, :].expand(b, -1, -1, -1)
        with torch.autocast(features.device.type, enabled=False):
            sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=True)
        return sampled[..., 0].transpose(1, 2)  # (B, N, D)
    y0, y1, wy = _bilinear_taps(coords[:, 0], height, h)
    x0, x1, wx = _bilinear_taps(coords[:, 1], width, w)
    corners = torch.cat([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx])
    with torch.autocast(features.device.type, enabled=False):
        index = corners.view(1, 1, -1).expand(b, d, -1)
        picks = features.reshape(b, d, h * w).gather(2, index).view(b, d, 4, -1)
        sampled = (picks.float() * weights).sum(2)  # (B, D, N)
    return sampled.transpose(1, 2)
