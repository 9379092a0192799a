"""benchmarks/step_time.py's interleaved timing, on timm's tiny test network."""

from __future__ import annotations

import argparse

import pytest
from helpers import imported_benchmark


@pytest.fixture(scope="module")
def bench():
    """The benchmark script, imported as a module."""
    yield from imported_benchmark("step_time")


def tiny_args(**changes) -> argparse.Namespace:
    args = argparse.Namespace(
        methods=["supervised", "pcr"],
        backbone="test_resnet",
        output_stride=16,
        crop=32,
        batch=2,
        classes=3,
        prototypes=2,
        sample_grid=8,
        loss="ce",
        precision="fp32",
        steps=3,
        warmup=1,
        device="cpu",
        set=["model.aspp_channels=16", "model.low_level_channels=8", "model.head_channels=16"],
    )
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_interleaved_timing_runs_every_method_in_turn(bench, monkeypatch):
    order = []
    build = bench.build_step

    def spy(args, name):
        step, device = build(args, name)

        def logged(i):
            order.append((name, i))
            return step(i)

        return logged, device

    monkeypatch.setattr(bench, "build_step", spy)
    rows = bench.run_interleaved(tiny_args())
    assert [r["method"] for r in rows] == ["supervised", "pcr"]
    assert all(r["steps"] == 3 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    timed = [name for name, i in order if i >= 1]
    # One step of each per round, the first method changing every round.
    assert timed == ["supervised", "pcr", "pcr", "supervised", "supervised", "pcr"]
