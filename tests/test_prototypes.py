"""The prototype bank against direct, loop-based computations of the paper's equations."""

from __future__ import annotations

import logging
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import protoseg.components.prototypes as prototypes_module
from protoseg.components.prototypes import (
    PrototypeBank,
    PrototypeSegmenter,
    gather_features,
    prototype_logits_full_res,
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
    assert set(bank.state_dict()) == {"prototypes", "initialized"}  # no pending buffers

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
    share = slice(rank * feats.shape[0] // 2, (rank + 1) * feats.shape[0] // 2)
    mine, my_labels = feats[share], labels[share]
    results: dict = {}
    try:
        bank = make_bank(c=3, m=2, d=8)
        bank.update(mine, my_labels)
        results["update"] = bank.prototypes.numpy().copy()
        for rule in ("batch_mean", "per_pixel"):
            # Each rank's share in two micro-batches (gradient accumulation), one EMA step.
            bank = make_bank(c=3, m=2, d=8, momentum=0.9)
            for part in (slice(0, 10), slice(10, None)):
                bank.accumulate(mine[part], my_labels[part], rule=rule)
            bank.apply_pending()
            results[rule] = bank.prototypes.numpy().copy()
    except Exception as exc:  # reported to the parent, which would otherwise wait forever
        results = {"error": repr(exc)}
    # A NumPy copy travels by value; a tensor would travel as a shared-memory handle that
    # the parent can no longer fetch once this process has exited.
    queue.put((rank, results))
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes (torch, gloo): tens of seconds on 2 cores
def test_two_process_update_gives_identical_banks_equal_to_one_process():
    feats = torch.randn(60, 8)
    labels = torch.randint(0, 3, (60,))
    labels[::9] = 255
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_sync_worker, args=(r, port, feats, labels, queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert "error" not in results[0] and "error" not in results[1], results
    single = make_bank(c=3, m=2, d=8)
    single.update(feats, labels)
    for key in ("update", "batch_mean", "per_pixel"):
        assert (results[0][key] == results[1][key]).all(), key
    assert torch.allclose(torch.from_numpy(results[0]["update"]), single.prototypes, atol=1e-6)
    # Accumulated on two ranks = one update on the concatenation, rank 0's pixels first; for
    # per_pixel that order matters, and summing each rank's closed form would not give it.
    for rule in ("batch_mean", "per_pixel"):
        single = make_bank(c=3, m=2, d=8, momentum=0.9)
        single.update(feats, labels, rule)
        got = torch.from_numpy(results[0][rule])
        assert torch.allclose(got, single.prototypes, atol=1e-6), rule


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


# ---- gradient accumulation: one EMA step per optimiser step (issue 11) ----------------------
def _micro_batches():
    """A batch whose two halves hit the same prototypes, so that two EMA steps differ from one."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(48, 8, generator=gen)
    labels = torch.randint(0, 3, (48,), generator=gen)
    labels[5::11] = 255
    return feats, labels, [slice(0, 20), slice(20, 48)]


@pytest.mark.parametrize("rule", ["batch_mean", "per_pixel"])
def test_accumulated_micro_batches_equal_one_update_on_the_concatenation(rule):
    feats, labels, parts = _micro_batches()
    whole = make_bank(momentum=0.9)
    whole_counts = whole.update(feats, labels, rule)
    accumulated = make_bank(momentum=0.9)
    for part in parts:
        accumulated.accumulate(feats[part], labels[part], rule=rule)
        assert accumulated.has_pending
        assert torch.equal(accumulated.prototypes, make_bank().prototypes)  # not moved yet
    counts = accumulated.apply_pending()
    assert not accumulated.has_pending
    assert torch.equal(counts, whole_counts)
    assert counts.shape == (3, 2) and counts.sum() == (labels != 255).sum()
    assert torch.allclose(accumulated.prototypes, whole.prototypes, atol=1e-6)
    if rule == "batch_mean":
        # One update per micro-batch (update() under accumulation) takes two EMA steps.
        # (per_pixel steps once per pixel anyway: there only the assignment of the second
        # micro-batch, against the moved bank, can differ.)
        per_call = make_bank(momentum=0.9)
        for part in parts:
            per_call.update(feats[part], labels[part], rule)
        assert (per_call.prototypes - whole.prototypes).abs().max() > 1e-3


@pytest.mark.parametrize("rule", ["batch_mean", "per_pixel"])
def test_accumulate_assigns_against_the_bank_before_the_step(rule):
    bank = make_bank(c=1, m=2, d=2, momentum=0.5)
    bank.prototypes.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    first, second = torch.tensor([[-1.0, 0.1]]), torch.tensor([[0.6, 0.8]])
    zero = torch.tensor([0])
    # Both pixels are nearest to prototype 1 of the bank as it is; had the first moved
    # prototype 1 to (-0.5, 0.55), the second would go to prototype 0 instead.
    bank.accumulate(first, zero, rule=rule)
    bank.accumulate(second, zero, rule=rule)
    assert bank.apply_pending().tolist() == [[0.0, 2.0]]
    assert torch.equal(bank.prototypes[0, 0], torch.tensor([1.0, 0.0]))
    per_call = make_bank(c=1, m=2, d=2, momentum=0.5)
    per_call.prototypes.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    per_call.update(first, zero, rule)
    assert per_call.update(second, zero, rule).tolist() == [[1.0, 0.0]]


def test_accumulate_reuses_each_micro_batch_similarity():
    feats, labels, parts = _micro_batches()
    plain, reused = make_bank(), make_bank()
    for part in parts:
        plain.accumulate(feats[part], labels[part])
        reused.accumulate(feats[part], labels[part], similarity=reused.similarity(feats[part]))
    plain.apply_pending()
    reused.apply_pending()
    assert torch.equal(plain.prototypes, reused.prototypes)


def test_apply_pending_with_nothing_pending_leaves_the_bank():
    bank = make_bank()
    before = bank.prototypes.clone()
    assert torch.equal(bank.apply_pending(), torch.zeros(3, 2))
    bank.accumulate(torch.randn(4, 8), torch.full((4,), 255))
    assert torch.equal(bank.apply_pending(), torch.zeros(3, 2))
    assert torch.equal(bank.prototypes, before)


def test_accumulate_rejects_mixed_and_unknown_rules():
    bank = make_bank()
    bank.accumulate(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), rule="per_pixel")
    with pytest.raises(ValueError, match="pending"):
        bank.accumulate(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), rule="batch_mean")
    bank.apply_pending()
    bank.accumulate(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), rule="batch_mean")
    with pytest.raises(ValueError, match="unknown update rule"):
        bank.update(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), rule="mean")


def test_saving_with_an_update_pending_warns_and_leaves_it_out():
    bank = make_bank()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank.state_dict()  # nothing pending: silent
    bank.accumulate(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    parent = torch.nn.ModuleDict({"bank": bank})
    with pytest.warns(RuntimeWarning, match="pending"):
        state = parent.state_dict()
    assert set(state) == {"bank.prototypes", "bank.initialized"}


def test_update_ignores_labels_outside_the_classes():
    bank = make_bank()
    before = bank.prototypes.clone()
    counts = bank.update(torch.randn(4, 8), torch.tensor([255, -1, 3, 7]))
    assert torch.equal(bank.prototypes, before) and counts.sum() == 0
    feats, cls, slot = bank.assign(torch.randn(4, 8), torch.tensor([255, 1, 3, 2]))
    assert feats.shape == (2, 8) and cls.tolist() == [1, 2] and slot.shape == (2,)


# ---- prototype head at the input resolution, as released (issue 11) -------------------------
def _release_head(bank: PrototypeBank, fmap: torch.Tensor, size) -> torch.Tensor:
    """What the release does: upsample the features, then classify every pixel."""
    up = F.interpolate(fmap, size=size, mode="bilinear", align_corners=True)
    return bank.logits(up)


@pytest.mark.parametrize(
    ("low", "size", "rows"),
    [
        ((7, 9), (29, 35), 4),  # odd sizes, chunks that do not divide the height
        ((7, 9), (29, 35), 1),
        ((8, 8), (33, 33), 1000),  # one chunk
        ((1, 5), (3, 17), 2),  # a single source row
        ((6, 1), (23, 4), 5),  # a single source column
        ((1, 1), (5, 6), 3),
        ((9, 13), (9, 13), 4),  # same size: no interpolation
        ((9, 13), (1, 1), 1),
        ((5, 7), (12, 16), 3),  # a non-integer scale
    ],
)
def test_full_res_logits_equal_upsample_then_classify(low, size, rows):
    bank = make_bank(c=5, m=3, d=16, seed=1)
    fmap = torch.randn(2, 16, *low, generator=torch.Generator().manual_seed(2))
    got = prototype_logits_full_res(bank, fmap, size, rows_per_chunk=rows)
    assert got.shape == (2, 5, *size) and got.dtype == torch.float32
    assert (got - _release_head(bank, fmap, size)).abs().max() < 2e-5


def test_segmenter_classifies_upsampled_features_not_upsampled_logits():
    bank = make_bank(c=4, m=2, d=6, seed=4)
    # Alternating features: between two source pixels the interpolated feature points
    # elsewhere than either, which interpolated logits cannot show.
    fmap = torch.randn(1, 6, 6, 6, generator=torch.Generator().manual_seed(5))
    fmap[..., ::2, ::2] *= -1

    class Net(torch.nn.Module):
        def forward(self, x):
            return {"features": fmap}

    size = (21, 21)
    logits = PrototypeSegmenter(Net(), bank, rows_per_chunk=5)(torch.zeros(1, 3, *size))["logits"]
    release = _release_head(bank, fmap, size)
    assert (logits - release).abs().max() < 2e-5
    upsampled_logits = F.interpolate(bank.logits(fmap), size, mode="bilinear", align_corners=True)
    changed = (upsampled_logits.argmax(1) != release.argmax(1)).float().mean()
    assert changed > 0.05  # the two orders really differ on this input


class _Shapes(TorchDispatchMode):
    """Records every op's name (with "[bool]" if a boolean mask is among its index
    arguments) and the sizes and dtypes of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.outputs: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
        masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        self.ops.append(str(func.overloadpacket) + ("[bool]" if masked else ""))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.numel(), t.dtype))
        return out


def test_full_res_logits_never_hold_a_full_size_feature_map():
    b, d, h, w, size, rows = 2, 64, 8, 10, (57, 73), 4
    bank = make_bank(c=5, m=3, d=d)
    fmap = torch.randn(b, d, h, w)
    with _Shapes() as rec:
        prototype_logits_full_res(bank, fmap, size, rows_per_chunk=rows)
    largest = max(n for n, _ in rec.outputs)
    k = bank.num_slots
    # The logits, the low-resolution products, and the products upsampled along x or for
    # one chunk of rows: never the features at full size.
    logits = b * bank.num_classes * size[0] * size[1]
    bound = max(logits, b * d * h * w, b * k * h * size[1], b * k * rows * size[1])
    assert largest <= bound < b * d * size[0] * size[1] // 4


def test_segmenter_rejects_bad_chunks_and_dims():
    bank = make_bank(d=8)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        prototype_logits_full_res(bank, torch.randn(1, 8, 3, 3), (5, 5), rows_per_chunk=0)
    with pytest.raises(ValueError, match="features must be"):
        prototype_logits_full_res(bank, torch.randn(1, 7, 3, 3), (5, 5))


# ---- the branch's cost (issue 15): same results, no syncs, no fp32 copy of the map ----------
def _reference_branch(prototypes: torch.Tensor, feats, labels, momentum, temperature):
    """The branch as first written: normalise, amax, boolean masks, one step per hit slot."""
    c, m, d = prototypes.shape
    protos_n = F.normalize(prototypes, dim=2).reshape(-1, d)
    sims = (F.normalize(feats, dim=1) @ protos_n.T).view(-1, c, m)
    logits = sims.amax(dim=2) / temperature
    keep = labels != 255
    x, cls = feats[keep], labels[keep]
    slot = sims.detach()[keep][torch.arange(cls.numel()), cls].argmax(1)
    flat = cls * m + slot
    sums = torch.zeros(c * m, d).index_add_(0, flat, x)
    counts = torch.zeros(c * m).index_add_(0, flat, torch.ones(cls.numel()))
    bank = prototypes.clone().view(c * m, d)
    hit = counts > 0
    mean = sums[hit] / counts[hit, None]
    bank[hit] = momentum * bank[hit] + (1 - momentum) * mean
    return logits, bank.view(c, m, d), counts.view(c, m)


def test_branch_equals_the_first_implementation():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(3000, 64, generator=gen)
    labels = torch.randint(0, 6, (3000,), generator=gen)
    labels[torch.rand(3000, generator=gen) < 0.2] = 255
    bank = make_bank(c=6, m=4, d=64)
    start = bank.prototypes.clone()
    logits_ref, protos_ref, counts_ref = _reference_branch(start, feats, labels, 0.99, 0.1)
    sims = bank.similarity(feats)
    logits = bank.logits_from_similarity(sims)
    counts = bank.update(feats, labels, similarity=sims)
    assert (logits - logits_ref).abs().max() < 1e-5  # cosines within 1e-6, times 1 / T
    assert torch.equal(counts, counts_ref)
    assert (bank.prototypes - protos_ref).abs().max() < 1e-6
    own = make_bank(c=6, m=4, d=64)  # assignments computed by update itself
    own.update(feats, labels)
    assert (own.prototypes - protos_ref).abs().max() < 1e-6


def test_logits_gradient_equals_amax_gradient_also_with_duplicate_prototypes():
    bank = make_bank(c=3, m=3, d=8)
    bank.prototypes[1, 2] = bank.prototypes[1, 0]  # k-means can repeat a centre: exact ties
    feats = torch.randn(50, 8, requires_grad=True)
    weights = torch.randn(50, 3)
    (bank.logits(feats) * weights).sum().backward()
    grad = feats.grad.clone()
    feats.grad = None
    (bank.similarity(feats).amax(dim=2) / bank.temperature * weights).sum().backward()
    assert torch.allclose(grad, feats.grad, atol=1e-5)


def test_branch_has_no_data_dependent_shapes_or_host_syncs(monkeypatch):
    # The accelerators' path, taken here on the CPU (which reads one count on the host).
    monkeypatch.setattr(prototypes_module, "_host_reads_are_free", lambda device: False)
    bank = make_bank(c=4, m=2, d=8)
    feats = torch.randn(40, 8)
    labels = torch.randint(0, 4, (40,))
    labels[::3] = 255
    with _Shapes() as rec:
        sims = bank.similarity(feats)
        bank.logits_from_similarity(sims)
        bank.update(feats, labels, similarity=sims)
        bank.accumulate(feats, labels, rule="per_pixel")
        bank.apply_pending()
    # Indexing with a boolean mask (a nonzero inside) gives a shape the host must wait
    # for; .item() and bool(tensor) are _local_scalar_dense: each waits for the device.
    syncing = {"aten.index[bool]", "aten.index_put_[bool]", "aten.nonzero", "aten.masked_select"}
    syncing.add("aten._local_scalar_dense")
    assert not syncing & set(rec.ops), syncing & set(rec.ops)


def test_gather_features_reads_a_bf16_map_in_bf16_when_asked():
    """The accelerators' path for a low-precision map (forced here, as the CPU takes the
    fp32 copy by default)."""
    gen = torch.Generator().manual_seed(8)
    fmap = torch.randn(2, 16, 20, 24, generator=gen)  # 480 pixels, 4 x 64 picks
    coords = sample_grid_coords(77, 93, 8, generator=gen)
    exact = gather_features(fmap, coords, (77, 93))
    low = fmap.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), _Shapes() as rec:
        got = gather_features(low, coords, (77, 93), corner_gather=True)
    assert got.dtype == torch.float32
    # The same bilinear weights on the bf16 values, in fp32: equal to the fp32 path on
    # the rounded map, and within bf16 rounding of the fp32 map.
    assert torch.allclose(got, gather_features(low.detach().float(), coords, (77, 93)), atol=1e-5)
    assert torch.allclose(got, exact, atol=2e-2, rtol=1e-2)
    assert not any(n >= fmap.numel() and t == torch.float32 for n, t in rec.outputs)
    # Gradient flows back to the map, as through the fp32 path.
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    ref = fmap.clone().requires_grad_()
    (gather_features(ref, coords, (77, 93)) * weights).sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16
    assert torch.allclose(low.grad.float(), ref.grad, atol=2e-2, rtol=1e-2)
    assert ref.grad.abs().sum() > 0


def test_gather_features_on_cpu_samples_a_bf16_map_as_fp32():
    gen = torch.Generator().manual_seed(9)
    fmap = torch.randn(2, 16, 20, 24, generator=gen).bfloat16()
    coords = sample_grid_coords(77, 93, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Shapes() as rec:
        got = gather_features(fmap, coords, (77, 93))
    # The fp32 copy of the whole map, then grid_sample: the fp32 path's result exactly.
    assert any(n == fmap.numel() and t == torch.float32 for n, t in rec.outputs)
    assert torch.equal(got, gather_features(fmap.float(), coords, (77, 93)))
    forced = gather_features(fmap, coords, (77, 93), corner_gather=True)
    assert torch.allclose(got, forced, atol=1e-5)


@pytest.mark.parametrize("rule", ["batch_mean", "per_pixel"])
def test_update_skipping_ignored_rows_equals_the_accelerators_path(monkeypatch, rule):
    """The CPU leaves the ignored pixels' rows unread; accelerators sum them into an extra
    bag to keep shapes fixed. Both must give the same bank, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(2000, 32, generator=gen)
    labels = torch.randint(0, 5, (2000,), generator=gen)
    labels[torch.rand(2000, generator=gen) < 0.4] = 255
    banks = []
    for free in (True, False):
        monkeypatch.setattr(
            prototypes_module, "_host_reads_are_free", lambda device, free=free: free
        )
        bank = make_bank(c=5, m=3, d=32)
        counts = bank.update(feats, labels, rule=rule)
        banks.append((bank.prototypes.clone(), counts))
        all_ignored = torch.full((2000,), 255)
        assert bank.update(feats, all_ignored, rule=rule).sum() == 0
        assert torch.equal(bank.prototypes, banks[-1][0])  # nothing labelled: nothing moves
    assert torch.equal(banks[0][0], banks[1][0])
    assert torch.equal(banks[0][1], banks[1][1])
    assert banks[0][1].sum() == (labels != 255).sum()


def test_logits_are_the_same_with_and_without_a_gradient():
    """Two kernels take the max over M (one when a gradient is kept): equal values."""
    bank = make_bank(c=4, m=3, d=16)
    bank.prototypes[2, 1] = bank.prototypes[2, 0]  # an exact tie
    feats = torch.randn(300, 16)
    with torch.no_grad():
        plain = bank.logits(feats)
    kept = bank.logits(feats.clone().requires_grad_())
    assert kept.requires_grad
    assert torch.equal(plain, kept.detach())
