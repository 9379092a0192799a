"""benchmarks/prototype_ops.py: every timed path must compute what the per-class loop does."""

from __future__ import annotations

import inspect
import subprocess
import types
from pathlib import Path

import pytest
import torch
from helpers import imported_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark script, imported as a module."""
    yield from imported_benchmark("prototype_ops")


def _diff_column(rows: list[str]) -> dict[str, float]:
    """The last cell ("max abs diff to loop") of every timed row, by operation."""
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[-1] != "-":
            out[cells[1]] = float(cells[-1])
    return out


def _inputs(n: int = 600, c: int = 5, m: int = 3, d: int = 16):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(n, d, generator=gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.3] = 255
    return feats, labels, torch.randn(c, m, d, generator=gen)


def test_every_row_matches_the_per_class_loop(bench):
    feats, labels, prototypes = _inputs()
    rows = bench.measure("tiny", feats, labels, prototypes, 1, torch.device("cpu"), None)
    assert len(rows) == 6
    diffs = _diff_column(rows)
    assert set(diffs) == {
        "similarity + logits + update",
        "update alone (own assignment)",
        "the same, speed first (values not kept)",
        "training: branch + logits' backward",
    }
    assert max(diffs.values()) < 1e-5, diffs


def test_the_training_path_gives_the_loops_gradient(bench):
    """The row's check covers the features' gradient: a wrong backward must show there."""
    feats, labels, prototypes = _inputs()
    grad = torch.randn(feats.shape[0], prototypes.shape[0])
    banks = [bench.PrototypeBank(*prototypes.shape) for _ in range(2)]
    for bank in banks:
        bank.prototypes.copy_(prototypes)
    fast = bench.training(bench.branch_for_training, grad)(banks[0], feats, labels)
    loop = bench.training(bench.naive_branch_for_training, grad)(banks[1], feats, labels)
    assert torch.allclose(fast[1], loop[1], atol=1e-5)
    assert not torch.allclose(fast[1], torch.zeros_like(fast[1]))
    assert torch.allclose(banks[0].prototypes, banks[1].prototypes, atol=1e-6)


def test_baseline_is_read_from_an_earlier_commit(bench):
    """The baseline is the bank's module as git holds it (a copy, not the imported module),
    and the table's diff column flags a baseline whose logits differ from the loop's."""
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    if git.returncode:
        pytest.skip("not a git checkout")
    module = bench.load_baseline("HEAD")
    assert module.PrototypeBank is not bench.PrototypeBank
    assert module.__file__ != inspect.getfile(bench.PrototypeBank)

    class OffByOne(module.PrototypeBank):  # type: ignore[name-defined, misc]
        def logits_from_similarity(self, sims):
            return super().logits_from_similarity(sims) + 1.0

    wrong = types.SimpleNamespace(PrototypeBank=OffByOne)
    feats, labels, prototypes = _inputs()
    rows = bench.measure("tiny", feats, labels, prototypes, 1, torch.device("cpu"), wrong)
    assert all(len(r.split("|")) == len(rows[0].split("|")) for r in rows)
    assert max(_diff_column(rows).values()) >= 0.5, rows
    with pytest.raises(SystemExit, match="no protoseg"):
        bench.load_baseline("this-is-not-a-revision")
