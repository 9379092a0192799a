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
        model="deeplabv3plus",
        backbone="test_resnet",
        checkpointing=False,
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


def test_vit_dpt_steps_train_the_vit_network_with_adamw(bench, monkeypatch):
    built = []
    from protoseg.engine import optim

    real = optim.build_optimizer

    def spy(model, cfg):
        built.append((type(model).__name__, model.backbone.checkpointing, cfg.name, cfg.lr))
        return real(model, cfg)

    monkeypatch.setattr(optim, "build_optimizer", spy)
    args = tiny_args(
        methods=["unimatch_v2+pcr"],
        model="vit_dpt",
        backbone="vit_small_patch14_dinov2",
        checkpointing=True,
        crop=32,
        set=[
            "model.vit.encoder_args={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, "
            "img_size: 32}",
            "model.vit.features=16",
            "model.vit.out_channels=[8,16,32,32]",
        ],
    )
    rows = bench.run_interleaved(args)
    assert rows[0]["method"] == "unimatch_v2+pcr" and rows[0]["steps"] == 3
    # UniMatch V2's optimiser, on the ViT + DPT network with its blocks checkpointed.
    assert built == [("ViTDPT", True, "adamw", 5e-6)]
