"""Entropy-based reliability of pseudo-labels (U2PL): which pixels are too uncertain to train on.

U2PL ranks the pixels of a batch by the entropy of the teacher's prediction: the most
uncertain share is *unreliable* and leaves the cross-entropy, and that share shrinks
linearly over training. Percentiles are taken per process over the real (non-padding)
pixels of the batch, as the release takes them per GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The release adds this inside the log so that zero probabilities give zero entropy.
ENTROPY_EPS = 1e-10


def pixel_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax of (B, C, H, W) logits over the classes: (B, H, W), in fp32."""
    prob = torch.softmax(logits.float(), dim=1)
    return -(prob * torch.log(prob + ENTROPY_EPS)).sum(dim=1)


def percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly as numpy's default.

    Two order statistics instead of a sort: ``torch.quantile`` refuses inputs above 2**24
    elements, fewer than a batch of Cityscapes crops holds.
    """
    flat = values.detach().flatten().float()
    n = flat.numel()
    if n == 0:
        raise ValueError("the percentile of an empty set is undefined")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} must lie in [0, 100]")
    position = q / 100.0 * (n - 1)
    below = math.floor(position)
    above = min(below + 1, n - 1)
    low = flat.kthvalue(below + 1).values
    high = flat.kthvalue(above + 1).values if above != below else low
    return low + (high - low) * (position - below)


def above_percentile(entropy: Tensor, valid: Tensor, q: float) -> Tensor:
    """Valid pixels whose entropy reaches the ``q``-th percentile of the valid pixels' entropies."""
    if not bool(valid.any()):
        return torch.zeros_like(valid)
    return (entropy >= percentile(entropy[valid], q)) & valid


def below_percentile(entropy: Tensor, valid: Tensor, q: float) -> Tensor:
    """Valid pixels whose entropy is at most the ``q``-th percentile of the valid pixels'."""
    if not bool(valid.any()):
        return torch.zeros_like(valid)
    return (entropy <= percentile(entropy[valid], q)) & valid


def reliable_cross_entropy(
    logits: Tensor, target: Tensor, reliable: Tensor, valid: Tensor
) -> Tensor:
    """U2PL's unsupervised loss: the mean CE over reliable pixels, times valid / reliable pixels.

    The factor (the release's ``batch_size * h * w / num_reliable``) keeps the loss's scale
    as the unreliable share changes; with no reliable pixel the loss is zero.
    """
    count = reliable.sum()
    if int(count) == 0:
        return logits.sum() * 0.0
    safe_target = torch.where(reliable, target, torch.zeros_like(target)).long()
    loss = F.cross_entropy(logits.float(), safe_target, reduction="none")
    mean = (loss * reliable).sum() / count
    return mean * (valid.sum() / count).detach()
