"""The prototype bank against direct, loop-based computations of the paper's equations."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from protoseg.components.prototypes import (
    PrototypeBank,
    PrototypeSegmenter,
    gather_features,
    sample_grid_coords,
)


def make_bank(c=3, m=2, d=8, seed=0, **kw) -> PrototypeBank:
    bank = PrototypeBank(c, m, d, **kw)
    bank.prototypes.copy_(torch.randn(c, m, d, generator=torch.Generator().manual_seed(seed)))
    bank.initialized.fill_(True)
    return bank


def test_logits_match_eq2_computed_directly():
    bank = make_bank(c=4, m=3, d=6, temperature=0.1)
    x = torch.randn(7, 6)
    got = bank.logits(x)
    for n in range(7):
        for c in range(4):
            sims = [F.cosine_similarity(x[n], bank.prototypes[c, k], dim=0) for k in range(3)]
            assert got[n, c].item() == pytest.approx(max(sims).item() / 0.1, abs=1e-4)
    # Eq. 2's posterior is the softmax of these logits; the temperature sharpens it.
    soft = make_bank(c=4, m=3, d=6, temperature=1.0).logits(x).softmax(1)
    assert (got.softmax(1).amax(1) >= soft.amax(1) - 1e-6).all()


def test_logits_on_feature_maps_equal_flattened():
    bank = make_bank(d=5)
    fmap = torch.randn(2, 5, 3, 4)
    dense = bank.logits(fmap)
    flat = bank.logits(fmap.permute(0, 2, 3, 1).reshape(-1, 5))
    assert dense.shape == (2, 3, 3, 4)
    assert torch.allclose(dense.permute(0, 2, 3, 1).reshape(-1, 3), flat)
    with pytest.raises(ValueError, match="features must be"):
        bank.logits(torch.randn(4, 6))


def naive_update(bank: PrototypeBank, feats, labels, rule):
    """Per-pixel loop: assign with the bank as it was at the start, then move prototypes."""
    start = bank.prototypes.clone()
    protos = start.clone()
    a = bank.momentum
    assigned: dict[tuple[int, int], list[torch.Tensor]] = {}
    for x, y in zip(feats, labels.tolist()):
        if y == 255:
            continue
        sims = [F.cosine_similarity(x, start[y, k], dim=0) for k in range(bank.per_class)]
        k = int(torch.stack(sims).argmax())
        assigned.setdefault((y, k), []).append(x)
    for (c, k), xs in assigned.items():
        if rule == "batch_mean":
            protos[c, k] = a * protos[c, k] + (1 - a) * torch.stack(xs).mean(0)
        else:
            for x in xs:
                protos[c, k] = a * protos[c, k] + (1 - a) * x
    return protos


@pytest.mark.parametrize("rule", ["batch_mean", "per_pixel"])
def test_update_matches_naive_loop(rule):
    bank = make_bank(c=3, m=2, d=8, momentum=0.9)
    feats = torch.randn(40, 8)
    labels = torch.randint(0, 2, (40,))  # class 2 gets no pixel
    labels[::7] = 255
    expected = naive_update(bank, feats, labels, rule)
    before = bank.prototypes.clone()
    counts = bank.update(feats, labels, rule)
    assert torch.allclose(bank.prototypes, expected, atol=1e-5)
    assert torch.equal(bank.prototypes[2], before[2])  # no pixels of class 2: untouched
    assert counts.sum().item() == (labels != 255).sum().item()


def test_update_only_moves_own_class_nearest_prototype():
    bank = make_bank(c=2, m=2, d=4, momentum=0.5)
    bank.prototypes.copy_(
        torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]], [[1.0, 0.1, 0, 0], [0, 0, 1.0, 0]]])
    )
    before = bank.prototypes.clone()
    # Closest overall to class 1's first prototype, but labelled 0: must move class 0's first.
    bank.update(torch.tensor([[1.0, 0.1, 0, 0]]), torch.tensor([0]))
    assert not torch.equal(bank.prototypes[0, 0], before[0, 0])
    assert torch.equal(bank.prototypes[0, 1], before[0, 1])
    assert torch.equal(bank.prototypes[1], before[1])
    expected = 0.5 * before[0, 0] + 0.5 * torch.tensor([1.0, 0.1, 0, 0])
    assert torch.allclose(bank.prototypes[0, 0], expected)


def test_update_ignores_255_and_empty_batches():
    bank = make_bank()
    before = bank.prototypes.clone()
    bank.update(torch.randn(5, 8), torch.full((5,), 255))
    assert torch.equal(bank.prototypes, before)


def test_kmeans_init_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(2, 3, 16, generator=gen) * 10
    feats, labels = [], []
    for c in range(2):
        for k in range(3):
            feats.append(centres[c, k] + 0.05 * torch.randn(50, 16, generator=gen))
            labels.append(torch.full((50,), c))
    bank = PrototypeBank(2, 3, 16)
    counts = bank.init_kmeans(torch.cat(feats), torch.cat(labels))
    assert counts == {0: 150, 1: 150}
    assert bool(bank.initialized)
    for c in range(2):
        dist = torch.cdist(centres[c], bank.prototypes[c])
        assert dist.min(dim=1).values.max() < 0.5  # every planted centre has a prototype


def test_kmeans_init_falls_back_for_rare_classes(caplog):
    feats = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 2])  # class 0: 2 distinct points; class 1: none
    bank = PrototypeBank(3, 3, 2)
    with caplog.at_level(logging.WARNING):
        counts = bank.init_kmeans(feats, labels)
    assert counts == {0: 3, 1: 0, 2: 1}
    rows = {tuple(r.tolist()) for r in bank.prototypes[0]}
    assert rows == {(1.0, 0.0), (0.0, 1.0)}  # two clusters, one repeated
    assert torch.allclose(bank.prototypes[2], torch.tensor([5.0, 5.0]).expand(3, 2))
    assert "class 1 has no labelled pixels" in caplog.text
    assert "duplicates" in caplog.text


def test_gather_features_equals_upsample_then_pick():
    fmap = torch.randn(2, 6, 17, 25)
    coords = sample_grid_coords(65, 97, 32, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(fmap, size=(65, 97), mode="bilinear", align_corners=True)
    expected = up[:, :, coords[:, 0], coords[:, 1]].transpose(1, 2)
    assert torch.allclose(gather_features(fmap, coords, (65, 97)), expected, atol=1e-5)


def test_grid_sampling_one_pixel_per_cell():
    coords = sample_grid_coords(64, 96, 32, generator=torch.Generator().manual_seed(3))
    assert coords.shape == (32 * 32, 2)
    cells = {(int(y) // 2, int(x) // 3) for y, x in coords}
    assert len(cells) == 32 * 32  # each 2x3 cell holds exactly one sample
    other = sample_grid_coords(64, 96, 32, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(coords, other)
    every = sample_grid_coords(5, 7, 0)
    assert every.shape == (35, 2) and len({tuple(c.tolist()) for c in every}) == 35
    small = sample_grid_coords(10, 12, 32)  # smaller than the grid: one per row/column
    assert small.shape == (120, 2)


def test_state_dict_round_trip_and_segmenter():
    bank = make_bank(c=3, m=2, d=512)
    other = PrototypeBank(3, 2, 512)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.prototypes, bank.prototypes) and bool(other.initialized)

    class Net(torch.nn.Module):
        def forward(self, x):
            return {"features": x.mean(1, keepdim=True).expand(-1, 512, -1, -1)[..., ::4, ::4]}

    seg = PrototypeSegmenter(Net(), bank)
    out = seg(torch.randn(1, 3, 33, 45))
    assert out["logits"].shape == (1, 3, 33, 45)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, port: int, feats, labels, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bank = make_bank(c=3, m=2, d=8)
    half = feats.shape[0] // 2
    part = slice(rank * half, (rank + 1) * half)
    bank.update(feats[part], labels[part])
    # A NumPy copy travels by value; a tensor would travel as a shared-memory handle that
    # the parent can no longer fetch once this process has exited.
    queue.put((rank, bank.prototypes.numpy().copy()))
    dist.destroy_process_group()


def test_two_process_update_gives_identical_banks_equal_to_one_process():
    feats = torch.randn(60, 8)
    labels = torch.randint(0, 3, (60,))
    single = make_bank(c=3, m=2, d=8)
    single.update(feats, labels)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_sync_worker, args=(r, port, feats, labels, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = {rank: torch.from_numpy(array) for rank, array in (queue.get() for _ in range(2))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert torch.equal(results[0], results[1])
    assert torch.allclose(results[0], single.prototypes, atol=1e-6)


def test_update_reuses_a_precomputed_similarity():
    feats = torch.randn(30, 8)
    labels = torch.randint(0, 3, (30,))
    labels[:4] = 255
    plain, reused = make_bank(), make_bank()
    sims = reused.similarity(feats)
    plain.update(feats, labels)
    reused.update(feats, labels, similarity=sims)
    assert torch.equal(plain.prototypes, reused.prototypes)
    stale = make_bank(seed=5).similarity(feats)  # a different bank's similarity changes slots
    other = make_bank()
    other.update(feats, labels, similarity=stale)
    assert not torch.equal(other.prototypes, plain.prototypes)
