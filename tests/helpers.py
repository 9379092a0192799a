"""Small shared pieces of the engine tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from feature_transform_stand_in import STAND_IN

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Per method, what takes its unlabelled losses from the first step on the tiny set.
METHOD_OVERRIDES = {
    "supervised": [],
    "mean_teacher": ["method.warmup_epochs=0"],
    "cutmix_seg": ["method.warmup_epochs=0"],
    "pcr": ["method.warmup_epochs=0", "method.prototypes.sample_grid=8"],
    "u2pl": ["method.warmup_epochs=0", "method.contrast.low_rank=1", "method.contrast.dim=16"],
    "cps": ["method.warmup_epochs=0"],
    "fixmatch": ["method.warmup_epochs=0"],
    "unimatch": ["method.warmup_epochs=0"],
    "fixmatch+pcr": ["method.warmup_epochs=0", "method.prototypes.sample_grid=8"],
    "unimatch+pcr": ["method.warmup_epochs=0", "method.prototypes.sample_grid=8"],
    "u2pl+pcr": [
        "method.warmup_epochs=0",
        "method.contrast.low_rank=1",
        "method.contrast.dim=16",
        "method.prototypes.sample_grid=8",
    ],
    "cps+pcr": ["method.warmup_epochs=0", "method.prototypes.sample_grid=8"],
    # No synthetic recipe: the network must take a feature transform (the stand-in's).
    "unimatch_v2": [f"model.name={STAND_IN}", "optim.name=adamw"],
    "unimatch_v2+pcr": [
        f"model.name={STAND_IN}",
        "method.warmup_epochs=0",
        "method.prototypes.sample_grid=8",
    ],
}


def tiny_overrides(root, out, *extra: str, method: str = "supervised") -> list[str]:
    """Overrides that shrink a synthetic recipe to seconds on a CPU (conftest's dataset)."""
    return [
        f"data.root={root}",
        "data.labeled_split=splits/8/labeled.txt",
        "data.unlabeled_split=splits/8/unlabeled.txt",
        f"train.out_dir={out}",
        "data.crop_size=48",
        "train.batch_size=4",
        "train.progress=false",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.device=cpu",
        "train.deterministic=true",
        *METHOD_OVERRIDES[method],
        *extra,
    ]


def poison_step(trainer, at_step: int, term: str | None = None) -> None:
    """Make the trainer's method return a NaN loss (and optionally a NaN term) at one step."""
    original = trainer.method.training_step

    def poisoned(labeled, unlabeled, step):
        out = original(labeled, unlabeled, step)
        if step == at_step:
            out["loss"] = out["loss"] * float("nan")
            if term:
                out[term] = out["loss"].detach()
        return out

    trainer.method.training_step = poisoned


def imported_benchmark(script: str) -> Iterator[ModuleType]:
    """A script of benchmarks/ imported as a module (benchmarks/ is no package), for a
    fixture to yield; it leaves sys.modules as it found it."""
    spec = importlib.util.spec_from_file_location(f"{script}_bench", BENCHMARKS / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
