"""U2PL's parts: entropy percentiles, the reliable CE, per-class queues and the pixel contrast."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from protoseg.components import (
    ClassQueues,
    ContrastConfig,
    above_percentile,
    below_percentile,
    contrastive_loss,
    percentile,
    pixel_entropy,
    reliable_cross_entropy,
)
from protoseg.components.contrast import class_members
from protoseg.distributed import all_gather_rows

IGNORE = 255


# ---- entropy and percentiles -----------------------------------------------------------------
@pytest.mark.parametrize("q", [0.0, 12.5, 20.0, 50.0, 80.0, 99.9, 100.0])
def test_percentile_matches_numpy(q):
    values = torch.randn(1001)
    assert percentile(values, q).item() == pytest.approx(np.percentile(values.numpy(), q), abs=1e-6)
    assert percentile(values[:2], q).item() == pytest.approx(np.percentile(values[:2], q), abs=1e-6)
    with pytest.raises(ValueError, match="empty"):
        percentile(values[:0], q)


def test_pixel_entropy_is_the_softmax_entropy():
    logits = torch.randn(2, 5, 3, 4)
    prob = torch.softmax(logits.double(), 1)
    expected = -(prob * prob.log()).sum(1)
    assert torch.allclose(pixel_entropy(logits).double(), expected, atol=1e-6)
    assert pixel_entropy(torch.tensor([[[[0.0]], [[-1e4]]]])).item() == pytest.approx(0, abs=1e-6)


def test_entropy_partition_counts_only_real_pixels():
    entropy = torch.rand(2, 10, 10)
    valid = torch.ones_like(entropy, dtype=torch.bool)
    valid[:, :, 5:] = False
    # Padding with the highest entropies must not move the threshold.
    entropy[~valid] += 10.0
    high = above_percentile(entropy, valid, 80.0)
    low = below_percentile(entropy, valid, 20.0)
    threshold = np.percentile(entropy[valid].numpy(), 80.0)
    assert torch.equal(high, (entropy >= float(threshold)) & valid)
    assert not (high & ~valid).any() and not (low & ~valid).any()
    assert high.sum().item() == 20 and low.sum().item() == 20
    none = torch.zeros_like(valid)
    assert not above_percentile(entropy, none, 80.0).any()


def test_reliable_ce_ignores_unreliable_pixels_and_rescales_by_their_share():
    logits = torch.randn(1, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 5))
    valid = torch.ones(1, 4, 5, dtype=torch.bool)
    reliable = torch.rand(1, 4, 5) < 0.6
    loss = reliable_cross_entropy(logits, target, reliable, valid)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    mean = ce[reliable].mean()
    # The release: mean CE over reliable pixels times (all pixels / reliable pixels).
    assert loss.item() == pytest.approx(mean.item() * 20 / reliable.sum().item(), rel=1e-5)
    loss.backward()
    assert (logits.grad.abs().sum(1)[~reliable] == 0).all()
    assert (logits.grad.abs().sum(1)[reliable] > 0).all()
    assert reliable_cross_entropy(logits, target, torch.zeros_like(valid), valid).item() == 0


# ---- queues ----------------------------------------------------------------------------------
def rows(start: int, stop: int, dim: int = 2) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, dim)


def test_queues_are_first_in_first_out_with_their_capacity():
    queues = ClassQueues([3, 5], dim=2)
    empty = rows(0, 0)
    queues.push([rows(0, 2), empty])
    assert torch.equal(queues.queue(0), rows(0, 2)) and queues.queue(1).shape == (0, 2)
    queues.push([rows(2, 5), rows(10, 12)])
    assert torch.equal(queues.queue(0), rows(2, 5))  # 0 and 1 were pushed out
    queues.push([rows(5, 6), rows(12, 20)])
    assert torch.equal(queues.queue(0), rows(3, 6))
    assert torch.equal(queues.queue(1), rows(15, 20))
    assert queues.length.tolist() == [3, 5]
    # Sampling draws from the stored rows, whatever their order.
    assert sorted(queues.stored(1)[:, 0].tolist()) == list(range(15, 20))


def test_queues_survive_a_state_dict_round_trip():
    queues = ClassQueues([4, 6], dim=3)
    queues.push([torch.randn(5, 3), torch.randn(2, 3)])
    copy = ClassQueues([4, 6], dim=3)
    copy.load_state_dict(queues.state_dict())
    more = [torch.randn(3, 3), torch.randn(5, 3)]
    queues.push(more)
    copy.push(more)
    for c in range(2):
        assert torch.equal(copy.queue(c), queues.queue(c))
        assert torch.equal(copy.stored(c), queues.stored(c))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queue_worker(rank: int, port: int, keys, result) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    queues = ClassQueues([4, 8], dim=2)
    queues.push(keys[rank])
    gathered = all_gather_rows(torch.full((rank + 1, 2), float(rank)))
    # NumPy copies travel by value (a tensor would be a shared-memory handle).
    result.put((rank, [queues.queue(c).numpy().copy() for c in range(2)], gathered.numpy()))
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes (torch, gloo): tens of seconds on 2 cores
def test_two_processes_hold_the_same_queues_as_one_process_pushing_both():
    keys = [[rows(0, 3), rows(100, 102)], [rows(3, 5), rows(200, 210)]]
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_queue_worker, args=(r, port, keys, result)) for r in range(2)]
    for p in procs:
        p.start()
    out = {rank: (queues, gathered) for rank, queues, gathered in (result.get() for _ in range(2))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = ClassQueues([4, 8], dim=2)
    single.push([torch.cat([keys[0][c], keys[1][c]]) for c in range(2)])  # rank order
    for rank in (0, 1):
        queues, gathered = out[rank]
        for c in range(2):
            assert np.array_equal(queues[c], single.queue(c).numpy())
        assert gathered[:, 0].tolist() == [0.0, 1.0, 1.0]  # uneven row counts
    assert torch.equal(all_gather_rows(rows(0, 3)), rows(0, 3))  # one process: unchanged


# ---- the contrastive loss --------------------------------------------------------------------
def contrast_batch(seed: int = 0):
    """One labelled and one unlabelled 4 x 4 map; teacher keys name their pixel (one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = 2, 4, 4, 4
    pixels = b * h * w
    keys = torch.eye(pixels).T.reshape(pixels, b, h, w).permute(1, 0, 2, 3).contiguous()
    prob = torch.softmax(torch.randn(b, c, h, w, generator=gen) * 3, dim=1)
    labels = torch.randint(0, c, (b, h, w), generator=gen)
    labels[0, 0, :2] = IGNORE
    labeled = labels[:1] != IGNORE
    entropy_rank = torch.rand(1, h, w, generator=gen)
    reliable = torch.cat([labeled, entropy_rank < 0.4])
    unreliable = torch.cat([labeled, entropy_rank > 0.6])
    return keys, prob, labels, reliable, unreliable


def pushed_pixels(queues: ClassQueues, c: int) -> set[int]:
    return set(queues.stored(c).argmax(dim=1).tolist())


@pytest.mark.parametrize("as_released", [False, True])
def test_negatives_are_unreliable_pixels_that_rank_the_class_low(as_released):
    keys, prob, labels, reliable, unreliable = contrast_batch()
    cfg = ContrastConfig(
        dim=keys.shape[1], low_rank=1, high_rank=3, queue_size=64, first_class_queue_size=64,
        num_queries=8, num_negatives=4, as_released=as_released,
    )  # fmt: skip
    queues = ClassQueues(cfg.capacities(4), cfg.dim)
    rep = torch.randn_like(keys, requires_grad=True)
    contrastive_loss(rep, keys, prob, labels, reliable, unreliable, 1, queues, cfg)
    labeled_row = torch.zeros_like(labels, dtype=torch.bool)
    labeled_row[0] = True
    for c in range(4):
        rank = (prob > prob[:, c : c + 1]).sum(dim=1)  # classes the teacher prefers to c
        if as_released:
            # Release: only pixels labelled c, and no labelled pixel can be both c and not c.
            expected = ~labeled_row & unreliable & (labels == c) & (rank >= 1) & (rank < 3)
        else:
            from_labeled = labeled_row & unreliable & (labels != c) & (rank < 1)
            from_unlabeled = ~labeled_row & unreliable & (rank >= 1) & (rank < 3)
            expected = from_labeled | from_unlabeled
        assert pushed_pixels(queues, c) == set(expected.flatten().nonzero()[:, 0].tolist())
    # Reliable-only unlabelled pixels are never negatives.
    reliable_only = (~labeled_row & reliable & ~unreliable).flatten().nonzero()[:, 0].tolist()
    assert not set().union(*(pushed_pixels(queues, c) for c in range(4))) & set(reliable_only)


def test_anchors_are_reliable_pixels_of_a_class_the_teacher_believes():
    keys, prob, labels, reliable, unreliable = contrast_batch(seed=3)
    cfg = ContrastConfig(
        dim=keys.shape[1], low_rank=1, high_rank=4, queue_size=64, first_class_queue_size=64,
        num_queries=64, num_negatives=4, current_class_threshold=0.3, as_released=False,
    )  # fmt: skip
    queues = ClassQueues(cfg.capacities(4), cfg.dim)
    queues.push([torch.randn(5, cfg.dim) for _ in range(4)])  # every class has negatives
    rep = torch.randn_like(keys, requires_grad=True)
    loss = contrastive_loss(rep, keys, prob, labels, reliable, unreliable, 1, queues, cfg)
    loss.backward()
    touched = rep.grad.abs().sum(dim=1) > 0
    own_prob = prob.gather(1, labels.clamp(max=3)[:, None])[:, 0]
    allowed = reliable & (labels != IGNORE) & (own_prob > 0.3)
    assert touched.any() and not (touched & ~allowed).any()
    assert loss.item() > 0


def test_one_class_in_the_batch_gives_no_contrast():
    keys, prob, _, reliable, unreliable = contrast_batch()
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    cfg = ContrastConfig(dim=keys.shape[1], low_rank=1, queue_size=8, first_class_queue_size=8)
    queues = ClassQueues(cfg.capacities(4), cfg.dim)
    rep = torch.randn_like(keys, requires_grad=True)
    loss = contrastive_loss(rep, keys, prob, labels, reliable, unreliable, 1, queues, cfg)
    assert loss.item() == 0 and loss.requires_grad


def test_contrast_config_names_bad_values():
    with pytest.raises(ValueError, match="high_rank"):
        ContrastConfig(low_rank=3, high_rank=3).check()
    with pytest.raises(ValueError, match="method.contrast.temperature"):
        ContrastConfig(temperature=0).check()
    assert ContrastConfig().capacities(3) == [50000, 30000, 30000]


def test_release_one_hot_fills_only_the_first_image_of_each_half():
    # U2PL's label_onehot scatters every image's labels into the first image's rows: in
    # each half (labelled rows, then unlabelled rows) the first image holds the union of
    # the half's classes per pixel (an ignored label counting as class 0, where the first
    # image itself is not ignored), the other images none.
    labels = torch.tensor(
        [
            [[0, 1], [2, 255]],  # labelled image 0
            [[1, 1], [255, 2]],  # labelled image 1
            [[2, 0], [1, 1]],  # unlabelled image 0
            [[2, 2], [0, 1]],  # unlabelled image 1
        ]
    )
    members = class_members(labels, 3, num_labeled=2, release_one_hot=True)
    assert not members[1].any() and not members[3].any()
    expected_labeled = torch.tensor(
        [
            [[True, False], [True, False]],
            [[True, True], [False, False]],
            [[False, False], [True, False]],
        ]
    )
    assert torch.equal(members[0], expected_labeled)
    expected_unlabeled = torch.tensor(
        [
            [[False, True], [True, False]],
            [[False, False], [True, True]],
            [[True, True], [False, False]],
        ]
    )
    assert torch.equal(members[2], expected_unlabeled)
    per_image = class_members(labels, 3, num_labeled=2, release_one_hot=False)
    assert torch.equal(per_image.long().argmax(1)[labels < 3], labels[labels < 3])
    assert not per_image.permute(0, 2, 3, 1)[labels == 255].any()
