"""Time of a recipe's training loaders alone: the batches its steps draw, without the network.

Builds the run's data side exactly as the trainer does (datasets, global batch sampler,
per-item augmentation seeds) and draws ``--steps`` steps of labelled (and, for methods that
learn from them, unlabelled) batches, once per variant: each ``--variant`` is a list of
overrides added to the config's. Prints milliseconds per step and a digest of the batches,
so that variants that must give the same data (e.g. ``data.cache_images``) can be seen to.

    python benchmarks/loader_time.py synthetic/pcr.yaml data.root=runs/demo/data \\
        --variant data.cache_images=false --variant data.cache_images=true
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def time_loaders(config: str, overrides: list[str], steps: int) -> tuple[float, str]:
    """Seconds per step of drawing ``steps`` steps' batches, and a digest of those batches."""
    import torch

    from protoseg.config import load_config
    from protoseg.distributed import DistInfo
    from protoseg.engine.data import TrainingData
    from protoseg.methods import METHODS

    cfg = load_config(config, overrides)
    data = TrainingData(cfg, DistInfo(rank=0, world_size=1, local_rank=0), torch.device("cpu"))
    # The method class says whether its steps draw unlabelled batches; no network is built.
    unlabeled_wanted = data.unlabeled is not None and METHODS[cfg.method.name].uses_unlabeled
    digest = hashlib.sha256()
    started = time.perf_counter()
    labeled, unlabeled = data.train_iterators(0, unlabeled_wanted)
    for _ in range(steps):
        batches = [next(labeled)] + ([next(unlabeled)] if unlabeled is not None else [])
        for batch in batches:
            for key in ("image", "mask", "valid"):
                if key in batch:
                    digest.update(batch[key].numpy().tobytes())
    return (time.perf_counter() - started) / steps, digest.hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    """Print one line per variant: ms per step and the batches' digest."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a recipe, e.g. synthetic/pcr.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value, for every variant")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's runs: 1)")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="space-separated overrides of one variant; repeat for several (default: none)",
    )
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for variant in args.variant or [""]:
        extra = variant.split()
        seconds, digest = time_loaders(args.config, [*args.overrides, *extra], args.steps)
        label = variant or "(config as given)"
        print(f"{label}: {seconds * 1e3:.1f} ms per step over {args.steps} steps, data {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
