"""Prototype operations alone: protoseg's vectorised bank against a naive loop implementation.

Same inputs, same results (checked), at the paper's sizes: D = 512, C = 21, M = 4; 16 images x
1,024 grid-sampled pixels (the training step), and every pixel of 16 stride-4 maps of a
513 crop (129 x 129, what "all pixels" costs). The naive versions loop over classes and
prototypes the way a first implementation would (one masked reduction per class/prototype).

    python benchmarks/prototype_ops.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from protoseg.components.prototypes import PrototypeBank


def naive_logits(bank: PrototypeBank, feats: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with a loop over classes and prototypes."""
    feats = F.normalize(feats, dim=1)
    out = torch.empty(feats.shape[0], bank.num_classes, device=feats.device)
    for c in range(bank.num_classes):
        best = None
        for m in range(bank.per_class):
            sim = feats @ F.normalize(bank.prototypes[c, m], dim=0)
            best = sim if best is None else torch.maximum(best, sim)
        out[:, c] = best / bank.temperature
    return out


def naive_update(bank: PrototypeBank, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Eq. 11 (batch mean) with a loop over classes and prototypes."""
    protos = bank.prototypes
    start = protos.clone()
    for c in range(bank.num_classes):
        mine = feats[labels == c]
        if mine.numel() == 0:
            continue
        sims = F.normalize(mine, dim=1) @ F.normalize(start[c], dim=1).T
        slot = sims.argmax(dim=1)
        for m in range(bank.per_class):
            assigned = mine[slot == m]
            if assigned.numel():
                protos[c, m] = bank.momentum * protos[c, m] + (1 - bank.momentum) * assigned.mean(0)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(
    label: str,
    feats: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    repeats: int,
    device: torch.device,
) -> None:
    """Time and check logits and update against the naive loops; print two table rows."""
    classes, per_class, dim = prototypes.shape
    bank = PrototypeBank(classes, per_class, dim).to(device)
    bank.prototypes.copy_(prototypes)
    fast = timed(lambda: bank.logits(feats), repeats, device)
    slow = timed(lambda: naive_logits(bank, feats), repeats, device)
    diff = (bank.logits(feats) - naive_logits(bank, feats)).abs().max().item()
    print(
        f"| logits (Eq. 2) | {label} | {fast:.4f} | {slow:.4f} | {slow / fast:.1f}x | {diff:.1e} |"
    )
    twin = PrototypeBank(classes, per_class, dim).to(device)

    def run_fast():
        bank.prototypes.copy_(prototypes)
        bank.update(feats, labels)

    def run_slow():
        twin.prototypes.copy_(prototypes)
        naive_update(twin, feats, labels)

    fast = timed(run_fast, repeats, device)
    slow = timed(run_slow, repeats, device)
    diff = (bank.prototypes - twin.prototypes).abs().max().item()
    print(
        f"| update (Eq. 11) | {label} | {fast:.4f} | {slow:.4f} | {slow / fast:.1f}x | {diff:.1e} |"
    )


def main() -> None:
    """Print a Markdown table of median times and speed-ups."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kmeans-pixels", type=int, default=2000, help="per class")
    args = parser.parse_args()
    device = torch.device(args.device)
    classes, per_class, dim = 21, 4, 512
    gen = torch.Generator().manual_seed(0)
    sizes = {"16 x 1,024 sampled": 16 * 1024, "16 x 129 x 129 (all, crop 513)": 16 * 129 * 129}
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"C={classes} M={per_class} D={dim}, median of {args.repeats}\n"
    )
    print("| operation | pixels | protoseg s | naive loop s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for label, n in sizes.items():
        feats = torch.randn(n, dim, generator=gen).to(device)
        labels = torch.randint(0, classes, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.2] = 255
        prototypes = torch.randn(classes, per_class, dim, generator=gen)
        compare(label, feats, labels.to(device), prototypes.to(device), args.repeats, device)
    n = classes * args.kmeans_pixels
    feats = torch.randn(n, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(args.kmeans_pixels)
    bank = PrototypeBank(classes, per_class, dim)
    seconds = timed(lambda: bank.init_kmeans(feats, labels), 1, torch.device("cpu"))
    print(
        f"| k-means init (scikit-learn, CPU) | {args.kmeans_pixels:,} per class | "
        f"{seconds:.2f} | - | - | - |"
    )


if __name__ == "__main__":
    main()
