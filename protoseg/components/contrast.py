"""U2PL's pixel contrast: per-class memory queues of negative keys and the InfoNCE loss on them.

For each class present in the batch, anchors are the student's representations of reliable
pixels of that class (confident for the teacher), the positive is the mean teacher
representation of the class's reliable pixels, and the negatives are teacher keys drawn
from the class's queue. Queues are filled with the teacher keys of *negative candidates*:
unreliable (high-entropy) unlabelled pixels that rank the class between ``low_rank`` and
``high_rank``, and labelled pixels of another class that rank it among the first
``low_rank``. With ``as_released`` the release's selection is kept exactly (see
``ContrastConfig``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.distributed import all_gather_rows


@dataclass
class ContrastConfig:
    """The ``method.contrast`` block: U2PL's ``trainer.contrastive`` section and queue sizes."""

    # Weight of the contrastive gradient, on any process count. The release's is its
    # ``loss_weight`` (absent from its configs: 1) divided by its GPU count, as it divides
    # the all-reduced loss by the world size and all_reduce passes no gradient
    # (docs/parity.md): 1/4 in its VOC runs, 1/8 in its Cityscapes runs.
    weight: float = 1.0
    # Width of the representation head's output: the key and anchor size.
    dim: int = 256
    # Per-class queue length; class 0 (VOC background, Cityscapes road) gets a longer one.
    queue_size: int = 30000
    first_class_queue_size: int = 50000
    num_queries: int = 256
    num_negatives: int = 50
    temperature: float = 0.5
    # Ranks of a class in the teacher's prediction that make a pixel a negative candidate.
    low_rank: int = 3
    high_rank: int = 20
    # An anchor's teacher probability of its class must exceed this (delta_p).
    current_class_threshold: float = 0.3
    # A negative's teacher probability of the class must stay below this (1: no limit).
    negative_threshold: float = 1.0
    # Share (percent) of unlabelled pixels that are reliable anchors and unreliable
    # negatives at the start; it falls linearly to 0 over training.
    low_entropy_threshold: float = 20.0
    # True: the release's loss_helper.py as published. Its negatives of class c are only
    # pixels whose (pseudo-)label *is* c (labelled pixels then never qualify), and the k-th
    # class with reliable pixels is contrasted using the anchors and positive of class k
    # (U2PL issues #171 and #111). False: the paper's definitions.
    as_released: bool = True
    # True: class membership as the release's label_onehot (u2pl/utils/utils.py) computes
    # it. Its scatter_ writes every image's one-hot into the first image's rows, so in each
    # half of the batch (labelled, unlabelled) only the first image has classes, and a pixel
    # of it belongs to every class some image of that half has there (an ignored label
    # counting as class 0). False: each pixel belongs to its own label's class only.
    release_one_hot: bool = True

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        positive = {
            "dim": self.dim,
            "queue_size": self.queue_size,
            "first_class_queue_size": self.first_class_queue_size,
            "num_queries": self.num_queries,
            "num_negatives": self.num_negatives,
            "temperature": self.temperature,
            "low_rank": self.low_rank,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"method.contrast.{key}={value} must be positive")
        if self.high_rank <= self.low_rank:
            raise ValueError(
                f"method.contrast.high_rank={self.high_rank} must exceed "
                f"method.contrast.low_rank={self.low_rank}"
            )
        if not 0.0 <= self.low_entropy_threshold <= 50.0:
            raise ValueError("method.contrast.low_entropy_threshold must lie in [0, 50]")
        if self.weight < 0:
            raise ValueError("method.contrast.weight must be >= 0")

    def capacities(self, num_classes: int) -> list[int]:
        """The queue length of every class."""
        return [self.first_class_queue_size] + [self.queue_size] * (num_classes - 1)


class ClassQueues(nn.Module):
    """One first-in-first-out queue of D-dim keys per class, all in one buffer.

    A push keeps the newest ``capacity`` keys of each class. Keys are gathered from every
    process before they are stored (as the release does), so every rank holds the same
    queues; the buffers are part of the state dict, so a resumed run continues with them.
    """

    keys: Tensor
    length: Tensor
    head: Tensor

    def __init__(self, capacities: Sequence[int], dim: int) -> None:
        super().__init__()
        self.capacities = [int(c) for c in capacities]
        self.offsets = [sum(self.capacities[:c]) for c in range(len(self.capacities))]
        self.register_buffer("keys", torch.zeros(sum(self.capacities), dim))
        # Keys each queue holds, and the row its next key goes to (a ring buffer).
        self.register_buffer("length", torch.zeros(len(self.capacities), dtype=torch.long))
        self.register_buffer("head", torch.zeros(len(self.capacities), dtype=torch.long))

    @torch.no_grad()
    def push(self, per_class: Sequence[Tensor]) -> None:
        """Append ``per_class[c]`` (N_c, D) to queue c, after gathering them from all processes."""
        if len(per_class) != len(self.capacities):
            raise ValueError(f"expected keys for {len(self.capacities)} classes")
        parts, ids = [], []
        for c, keys in enumerate(per_class):
            # Only the newest `capacity` keys can survive the push: send no more.
            keys = keys.detach()[-self.capacities[c] :].to(self.keys.dtype)
            parts.append(keys)
            ids.append(torch.full((keys.shape[0],), c, dtype=torch.long, device=keys.device))
        keys = all_gather_rows(torch.cat(parts).to(self.keys.device))
        classes = all_gather_rows(torch.cat(ids).to(self.keys.device))
        lengths, heads = self.length.tolist(), self.head.tolist()
        for c in classes.unique().tolist():
            capacity = self.capacities[c]
            new = keys[classes == c][-capacity:]
            rows = (heads[c] + torch.arange(new.shape[0], device=new.device)) % capacity
            self.keys[rows + self.offsets[c]] = new
            heads[c] = (heads[c] + new.shape[0]) % capacity
            lengths[c] = min(lengths[c] + new.shape[0], capacity)
        self.length.copy_(torch.tensor(lengths))
        self.head.copy_(torch.tensor(heads))

    def stored(self, c: int) -> Tensor:
        """The keys queue ``c`` holds, in storage order (what sampling draws from)."""
        start = self.offsets[c]
        return self.keys[start : start + int(self.length[c])]

    def queue(self, c: int) -> Tensor:
        """The keys of queue ``c`` from the oldest to the newest."""
        stored = self.stored(c)
        if stored.shape[0] < self.capacities[c]:
            return stored
        return torch.roll(stored, -int(self.head[c]), dims=0)


def class_ranks(prob: Tensor) -> Tensor:
    """The rank of every class in each pixel's prediction, 0 for the most likely: (B, C, H, W)."""
    return prob.argsort(dim=1, descending=True).argsort(dim=1)


def class_members(
    labels: Tensor, num_classes: int, num_labeled: int, release_one_hot: bool
) -> Tensor:
    """(B, C, h, w) bool: whether each pixel counts as class c (see ``release_one_hot``).

    ``labels`` (B, h, w) holds a class in [0, C) or anything else for no class; the first
    ``num_labeled`` rows are the labelled half of the batch.
    """
    members = torch.stack([labels == c for c in range(num_classes)], dim=1)
    if not release_one_hot:
        return members
    out = torch.zeros_like(members)
    for start, stop in ((0, num_labeled), (num_labeled, labels.shape[0])):
        if stop <= start:
            continue
        part = labels[start:stop]
        known = (part >= 0) & (part < num_classes)
        filled = torch.where(known, part, torch.zeros_like(part))
        union = torch.stack([(filled == c).any(dim=0) for c in range(num_classes)])
        out[start] = union & known[0]
    return out


def contrastive_loss(
    rep: Tensor,
    rep_teacher: Tensor,
    prob_teacher: Tensor,
    labels: Tensor,
    reliable: Tensor,
    unreliable: Tensor,
    num_labeled: int,
    queues: ClassQueues,
    cfg: ContrastConfig,
) -> Tensor:
    """Push this batch's negative keys, then the InfoNCE loss of the anchors against the queues.

    All maps share the representation's resolution: ``rep`` (B, D, h, w) of the student,
    ``rep_teacher`` and ``prob_teacher`` (B, C, h, w) of the teacher, ``labels`` (B, h, w)
    (ground truth for the first ``num_labeled`` rows, pseudo-labels after; any value
    outside [0, C) is no class), ``reliable`` and ``unreliable`` (B, h, w) pixel masks (on
    labelled rows both mark the labelled pixels).
    """
    num_classes = prob_teacher.shape[1]
    feats = rep.permute(0, 2, 3, 1)
    keys = rep_teacher.detach().permute(0, 2, 3, 1)
    prob = prob_teacher.detach()
    ranks = class_ranks(prob)
    labeled_row = torch.zeros_like(labels, dtype=torch.bool)
    labeled_row[:num_labeled] = True
    members = class_members(labels, num_classes, num_labeled, cfg.release_one_hot)
    class_reliable, anchors, negatives, present = [], [], [], []
    for c in range(num_classes):
        member = members[:, c]
        reliable_c = member & reliable
        # Labelled pixels of another class that the teacher ranks c among the first low_rank;
        # unlabelled pixels that it ranks c in [low_rank, high_rank).
        rank = ranks[:, c]
        candidate = torch.where(
            labeled_row,
            (rank < cfg.low_rank) & ~member,
            (rank >= cfg.low_rank) & (rank < cfg.high_rank),
        )
        pool = member & unreliable if cfg.as_released else unreliable
        negatives.append(keys[pool & candidate & (prob[:, c] < cfg.negative_threshold)])
        class_reliable.append(reliable_c)
        anchors.append(reliable_c & (prob[:, c] > cfg.current_class_threshold))
        if bool(reliable_c.any()):
            present.append(c)
    # The batch's own keys are in the queues before negatives are drawn, as in the release.
    queues.push(negatives)
    zero = rep.sum() * 0.0
    if len(present) <= 1:
        return zero
    total = zero
    for k, c in enumerate(present):
        source = k if cfg.as_released else c
        pool_anchor = feats[anchors[source]]
        stored = queues.stored(c)
        if pool_anchor.shape[0] == 0 or stored.shape[0] == 0:
            continue
        # Indices from the CPU generator (as the release): checkpoints restore it exactly.
        pick = torch.randint(pool_anchor.shape[0], (cfg.num_queries,))
        anchor = pool_anchor[pick.to(pool_anchor.device)]
        with torch.no_grad():
            drawn = torch.randint(stored.shape[0], (cfg.num_queries * cfg.num_negatives,))
            negative = stored[drawn.to(stored.device)].view(cfg.num_queries, cfg.num_negatives, -1)
            positive = keys[class_reliable[source]].float().mean(dim=0)
            candidates = torch.cat(
                [positive.expand(cfg.num_queries, 1, -1), negative.float()], dim=1
            )
        logits = F.cosine_similarity(anchor.float()[:, None], candidates, dim=2)
        target = torch.zeros(cfg.num_queries, dtype=torch.long, device=logits.device)
        total = total + F.cross_entropy(logits / cfg.temperature, target)
    return total / len(present)
