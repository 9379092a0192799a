"""Prototype operations alone: protoseg's bank against the matrix product it is built on and
against a per-class loop.

Same inputs, results checked, at the paper's sizes: D = 512, C = 21, M = 4, 20% of pixels
ignored; 16 images x 1,024 grid-sampled pixels (the training step) and every pixel of 16
stride-4 maps of a 513 crop (129 x 129, what "all pixels" costs). Rows:

- product alone: the (N, D) x (D, C * M) matrix product, the floor of the branch;
- similarity + logits + update: the PCR branch (Eq. 2 logits, then Eq. 11's update reusing
  the similarities), against the release's loop (per class: logits, then assignment and
  mean per prototype);
- update alone: ``bank.update`` computing its own assignments, against the per-class loop;
- in training: the branch with the backward pass of its logits (what a training step pays),
  against the product's forward and backward.

The operations are timed in interleaved rounds (one call of each per round) and the
median is reported, so that a busy machine slows all of them alike. ``--baseline REV``
adds a column for the bank's module as it was at git revision REV.

``--profile`` prints torch.profiler's top operators of the branch instead (and of the
baseline's, with ``--baseline``).

    python benchmarks/prototype_ops.py [--device cuda] [--repeats 7] [--threads N]
                                       [--sizes sampled,all] [--baseline REV] [--profile]
                                       [--kmeans-pixels 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from protoseg.components.prototypes import PrototypeBank

ROOT = Path(__file__).resolve().parents[1]


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


BANK_MODULE_PATHS = ("protoseg/components/prototypes.py", "protoseg/prototypes.py")


def load_baseline(rev: str) -> ModuleType:
    """The bank's module as it was at git revision ``rev`` (wherever it lived then)."""
    for relative in BANK_MODULE_PATHS:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{relative}"], capture_output=True, text=True
        )
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        sys.exit(f"no {' or '.join(BANK_MODULE_PATHS)} at git revision {rev!r}")
    path = Path(tempfile.mkdtemp()) / "baseline_prototypes.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_prototypes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed_together(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each function, called once per round for ``repeats`` rounds."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def branch(bank, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PCR's prototype branch: similarities, Eq. 2 logits, Eq. 11 update reusing them."""
    sims = bank.similarity(feats)
    logits = bank.logits_from_similarity(sims)
    bank.update(feats, labels, similarity=sims)
    return logits


def own_update(bank, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Eq. 11 with the bank computing its own assignments (no similarities passed)."""
    bank.update(feats, labels)


def speed_first_branch(bank, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`branch` as fast as PyTorch's kernels allow when equal values need not be kept
    (not protoseg's path: it rounds differently, which would move every trained number).

    The max over M is taken on the raw products and divided by |x| T once (C columns
    instead of C * M), the own-class argmax reads the same products, and the sort that
    groups pixels by prototype need not be stable. Batch-mean rule, CPU or accelerator.
    """
    classes, per_class, dim = bank.prototypes.shape
    slots = classes * per_class
    with torch.no_grad():
        norms = torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min(1e-12)
        products = feats @ F.normalize(bank.prototypes, dim=2).reshape(slots, dim).T
        best = F.max_pool1d(products.view(-1, 1, slots), per_class).view(-1, classes)
        logits = best / (norms * bank.temperature)
        valid = (labels >= 0) & (labels < classes)
        cls = torch.where(valid, labels, 0)
        rows = torch.arange(cls.numel(), device=cls.device) * classes + cls
        nearest = products.view(-1, per_class).index_select(0, rows).argmax(1)
        flat = torch.where(valid, cls * per_class + nearest, slots)
        sorted_slots, order = torch.sort(flat)
        bounds = torch.searchsorted(sorted_slots, torch.arange(slots + 2, device=flat.device))
        sums = F.embedding_bag(order, feats, bounds[: slots + 1], mode="sum")[:slots]
        counts = (bounds[1 : slots + 1] - bounds[:slots]).float()
        protos = bank.prototypes.view(slots, dim)
        moved = bank.momentum * protos + (1 - bank.momentum) * sums / counts.clamp_min(1)[:, None]
        protos.copy_(torch.where((counts > 0)[:, None], moved, protos))
    return logits


def naive_branch(bank, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same with the per-class loops."""
    logits = naive_logits(bank, feats)
    naive_update(bank, feats, labels)
    return logits


def training(fn: Callable, grad: torch.Tensor) -> Callable:
    """``fn``'s branch as a training step runs it: features that need a gradient, the
    logits' backward with ``grad`` (a stand-in for the loss's), the update on detached
    features. Returns the logits and the features' gradient."""

    def run(bank, feats: torch.Tensor, labels: torch.Tensor):
        leaf = feats.detach().requires_grad_()
        logits = fn(bank, leaf, labels)
        logits.backward(grad)
        return logits.detach(), leaf.grad

    return run


def branch_for_training(bank, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`branch` as PrototypeBranch.losses calls it: the update on detached features."""
    sims = bank.similarity(feats)
    logits = bank.logits_from_similarity(sims)
    bank.update(feats.detach(), labels, similarity=sims)
    return logits


def naive_branch_for_training(bank, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-class loops, the update on detached features."""
    logits = naive_logits(bank, feats)
    naive_update(bank, feats.detach(), labels)
    return logits


def measure(
    label: str,
    feats: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    repeats: int,
    device: torch.device,
    baseline: ModuleType | None,
) -> list[str]:
    """Time and check the three operations at one size; Markdown table rows."""
    classes, per_class, dim = prototypes.shape
    banks = {"new": PrototypeBank(classes, per_class, dim).to(device)}
    banks["loop"] = PrototypeBank(classes, per_class, dim).to(device)
    if baseline is not None:
        banks["base"] = baseline.PrototypeBank(classes, per_class, dim).to(device)
    normalized = F.normalize(prototypes, dim=2).reshape(-1, dim)

    def fresh(name: str, fn: Callable[..., object]) -> Callable[[], object]:
        def run() -> object:
            banks[name].prototypes.copy_(prototypes)  # every call starts from the same bank
            return fn(banks[name], feats, labels)

        return run

    generator = torch.Generator().manual_seed(1)
    logits_grad = torch.randn(feats.shape[0], classes, generator=generator).to(device)
    product_grad = torch.randn(feats.shape[0], classes * per_class, generator=generator)
    product_grad = product_grad.to(device)

    def product_with_backward() -> None:
        leaf = feats.detach().requires_grad_()
        (leaf @ normalized.T).backward(product_grad)

    fns: dict[str, Callable[[], object]] = {
        "product": lambda: feats @ normalized.T,
        "product+backward": product_with_backward,
    }
    for name in banks:
        loop = name == "loop"
        fns[f"branch/{name}"] = fresh(name, naive_branch if loop else branch)
        fns[f"update/{name}"] = fresh(name, naive_update if loop else own_update)
        trained = naive_branch_for_training if loop else branch_for_training
        fns[f"train/{name}"] = fresh(name, training(trained, logits_grad))
    fns["speed-first"] = fresh("new", speed_first_branch)
    seconds = timed_together(fns, repeats, device)

    diffs = {}
    for op in ("branch", "update", "train"):
        results = {}
        for name in banks:
            out = fns[f"{op}/{name}"]()
            results[name] = (out, banks[name].prototypes.clone())
        ref_out, ref_protos = results["loop"]
        diffs[op] = {}
        for name in banks:
            out, protos = results[name]
            diff = (protos - ref_protos).abs().max().item()
            if op == "branch":
                diff = max(diff, (out - ref_out).abs().max().item())
            if op == "train":  # logits and the features' gradient
                diff = max(diff, *((a - b).abs().max().item() for a, b in zip(out, ref_out)))
            diffs[op][name] = diff
    logits = fns["speed-first"]()
    ref_logits, ref_protos = fns["branch/loop"](), banks["loop"].prototypes
    speed_first_diff = max(
        (logits - ref_logits).abs().max().item(),
        (banks["new"].prototypes - ref_protos).abs().max().item(),
    )

    def row(op: str, title: str, reference: str = "product") -> str:
        new, loop = seconds[f"{op}/new"], seconds[f"{op}/loop"]
        product = seconds[reference]
        cells = [
            label,
            title,
            f"{new * 1e3:.1f}",
            f"{new / product:.2f}x",
            f"{loop * 1e3:.1f}",
            f"{loop / new:.2f}x",
        ]
        if baseline is not None:
            base = seconds[f"{op}/base"]
            cells += [f"{base * 1e3:.1f}", f"{base / product:.2f}x", f"{base / new:.2f}x"]
        cells.append(f"{max(d for n, d in diffs[op].items() if n != 'loop'):.1e}")
        return "| " + " | ".join(cells) + " |"

    empty = ["-"] * (3 if baseline is not None else 0)

    speed_first = seconds["speed-first"]
    speed_first_cells = [
        label,
        "the same, speed first (values not kept)",
        f"{speed_first * 1e3:.1f}",
        f"{speed_first / seconds['product']:.2f}x",
        "-",
        "-",
        *empty,
        f"{speed_first_diff:.1e}",
    ]
    speed_first_row = "| " + " | ".join(speed_first_cells) + " |"

    def reference_row(name: str, title: str) -> str:
        cells = [label, title, f"{seconds[name] * 1e3:.1f}", "1.00x", "-", "-", *empty, "-"]
        return "| " + " | ".join(cells) + " |"

    return [
        reference_row("product", "product alone (N,D)x(D,C*M)"),
        row("branch", "similarity + logits + update"),
        row("update", "update alone (own assignment)"),
        speed_first_row,
        reference_row("product+backward", "product forward + backward"),
        row("train", "training: branch + logits' backward", "product+backward"),
    ]


def profile_branch(
    label: str,
    feats: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    repeats: int,
    modules: dict[str, ModuleType],
) -> None:
    """Print torch.profiler's top operators (self time) of ``repeats`` calls of the branch,
    without a gradient and as a training step runs it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if feats.is_cuda:
        activities.append(ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if feats.is_cuda else "self_cpu_time_total"
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(feats.shape[0], prototypes.shape[0], generator=generator).to(feats.device)
    paths = {
        "similarity + logits + update": branch,
        "training: branch + logits' backward": training(branch_for_training, grad),
    }
    for name, module in modules.items():
        for title, fn in paths.items():
            bank = module.PrototypeBank(*prototypes.shape).to(feats.device)
            bank.prototypes.copy_(prototypes)
            fn(bank, feats, labels)  # warm-up
            with profile(activities=activities, record_shapes=True) as prof:
                for _ in range(repeats):
                    bank.prototypes.copy_(prototypes)
                    fn(bank, feats, labels)
            print(f"\n### {name}: {title}, {label}, {repeats} calls\n")
            averages = prof.key_averages(group_by_input_shape=True)
            print(averages.table(sort_by=sort_by, row_limit=12, max_name_column_width=40))


def main() -> None:
    """Print a Markdown table of median times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--baseline", default="", help="git revision to compare against")
    parser.add_argument("--sizes", default="sampled,all", help="sampled, all, or both")
    parser.add_argument("--profile", action="store_true", help="profile the branch instead")
    parser.add_argument(
        "--kmeans-pixels", type=int, default=0, help="per class; 0 skips the k-means row"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    baseline = load_baseline(args.baseline) if args.baseline else None
    classes, per_class, dim = 21, 4, 512
    gen = torch.Generator().manual_seed(0)
    sizes = {"sampled": ("16 x 1,024 sampled", 16 * 1024)}
    sizes["all"] = ("16 x 129 x 129 (all, crop 513)", 16 * 129 * 129)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"C={classes} M={per_class} D={dim}, median of {args.repeats} interleaved rounds"
        + (f", baseline {args.baseline}" if baseline is not None else "")
        + "\n"
    )
    modules = {"protoseg": sys.modules[PrototypeBank.__module__]}
    if baseline is not None:
        modules[f"baseline {args.baseline}"] = baseline
    header = [
        "pixels",
        "operation",
        "protoseg ms",
        "/ its product",
        "per-class loop ms",
        "loop / new",
    ]
    if baseline is not None:
        header += ["baseline ms", "baseline / product", "baseline / new"]
    header.append("max abs diff to loop")
    if not args.profile:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for key in args.sizes.split(","):
        label, n = sizes[key]
        feats = torch.randn(n, dim, generator=gen).to(device)
        labels = torch.randint(0, classes, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 0.2] = 255
        prototypes = torch.randn(classes, per_class, dim, generator=gen).to(device)
        if args.profile:
            profile_branch(label, feats, labels.to(device), prototypes, args.repeats, modules)
            continue
        rows = measure(label, feats, labels.to(device), prototypes, args.repeats, device, baseline)
        print("\n".join(rows), flush=True)
    if args.kmeans_pixels:
        n = classes * args.kmeans_pixels
        feats = torch.randn(n, dim, generator=gen)
        labels = torch.arange(classes).repeat_interleave(args.kmeans_pixels)
        bank = PrototypeBank(classes, per_class, dim)
        start = time.perf_counter()
        bank.init_kmeans(feats, labels)
        seconds = time.perf_counter() - start
        pixels = f"{args.kmeans_pixels:,} per class"
        print(f"\nk-means init (scikit-learn, CPU), {pixels}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
