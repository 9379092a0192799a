"""Training-step time and peak memory of supervised, cutmix_seg and pcr at a fixed model and crop.

``--model vit_dpt`` times a timm ViT encoder (``--backbone``, e.g. vit_small_patch14_dinov2)
with UniMatch V2's DPT decoder instead of DeepLabv3+, trained by AdamW at UniMatch V2's
settings (lr 5e-6, decoder x40, weight decay 0.01) unless ``--set optim.*`` says otherwise;
``--checkpointing`` recomputes its encoder blocks in the backward pass.

Each method runs in its own subprocess (so peak RSS is its own) on synthetic in-memory batches
(no data loading), timing forward + backward + optimiser step + EMA/bank updates. Reports
medians over ``--steps`` steps after ``--warmup`` untimed ones, and PCR's time as a ratio to
cutmix_seg's measured in the same invocation. ``--interleave`` times every method in one
process instead, a step of each in turn, so that a machine whose speed drifts (a shared CPU)
slows them alike: use it for the ratios, the default for memory.

    python benchmarks/step_time.py --backbone resnet18 --crop 80 --batch 8
    python benchmarks/step_time.py --backbone resnet101s --crop 513 --batch 2 --device cuda
    python benchmarks/step_time.py --model vit_dpt --backbone vit_small_patch14_dinov2 \
        --methods unimatch_v2 unimatch_v2+pcr pcr --crop 112 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_step(args: argparse.Namespace, name: str):
    """Build ``name``'s method at the benchmark's model and crop; return (step, device).

    ``step(i)`` runs training step ``i`` on a fresh random batch (forward, backward,
    optimiser step, EMA/bank updates) and returns its wall time in seconds.
    """
    import torch

    from protoseg.config import load_config, method_config_class
    from protoseg.engine.optim import build_optimizer
    from protoseg.lifecycle import InitContext
    from protoseg.methods import create_method
    from protoseg.models import create_model

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    defaults = method_config_class(name)()
    method_keys = []
    if hasattr(defaults, "warmup_epochs"):
        method_keys.append("method.warmup_epochs=0")
    if hasattr(defaults, "prototypes"):
        method_keys.append(f"method.prototypes.per_class={args.prototypes}")
        method_keys.append(f"method.prototypes.sample_grid={args.sample_grid}")
    if args.model == "vit_dpt":
        model_keys = [
            "model.name=vit_dpt",
            f"model.vit.checkpointing={str(args.checkpointing).lower()}",
            # UniMatch V2's optimiser (configs/*.yaml of its release); --set may change it.
            "optim.name=adamw",
            "optim.lr=5e-6",
            "optim.decoder_lr_mult=40",
            "optim.weight_decay=0.01",
        ]
    else:
        model_keys = [f"model.output_stride={args.output_stride}"]
    cfg = load_config(
        None,
        [
            "data.root=unused",
            f"data.num_classes={args.classes}",
            f"model.backbone={args.backbone}",
            *model_keys,
            f"method.name={name}",
            *method_keys,
            f"train.loss={args.loss}",
            f"train.precision={args.precision}",
            *args.set,
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.data.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    method = create_method(model, cfg).to(device)
    method.setup(steps_per_epoch=1000)
    optimizer = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(0)

    def batch():
        labeled = {
            "image": torch.randn(args.batch, 3, args.crop, args.crop, generator=gen),
            "mask": torch.randint(
                0, args.classes, (args.batch, args.crop, args.crop), generator=gen
            ),
        }
        unlabeled = {"image": torch.randn(args.batch, 3, args.crop, args.crop, generator=gen)}
        return (
            {k: v.to(device) for k, v in labeled.items()},
            {k: v.to(device) for k, v in unlabeled.items()},
        )

    # The one-time set-up (a prototype bank's k-means) that training would run at step 0.
    method.before_step(0, lambda: InitContext([batch()[0]], device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    method.train()

    def step(i: int) -> float:
        labeled, unlabeled = batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = method.training_step(labeled, unlabeled, step=i)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step, device


def describe(device, times: list[float]) -> dict:
    """The JSON-ready fields every row has: times, device and thread count."""
    import torch

    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "steps": len(times),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_single(args: argparse.Namespace) -> dict:
    """Time one method in this process (so the peak memory is its own)."""
    import torch

    step, device = build_step(args, args.method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step(i) for i in range(args.warmup + args.steps)][args.warmup :]
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "max allocated (CUDA)"
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory_kind = "peak RSS"
    return {
        "method": args.method,
        **describe(device, times),
        "memory_mib": memory,
        "memory_kind": memory_kind,
    }


def run_interleaved(args: argparse.Namespace) -> list[dict]:
    """Time every method in one process, one step of each in turn (the order rotating each
    round), so that a machine whose speed drifts slows every method alike."""
    steps = {}
    for name in args.methods:
        steps[name], device = build_step(args, name)
        for i in range(args.warmup):
            steps[name](i)
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    for r in range(args.steps):
        order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
        for name in order:
            times[name].append(steps[name](args.warmup + r))
    return [
        {"method": n, **describe(device, t), "memory_mib": None, "memory_kind": "one process"}
        for n, t in times.items()
    ]


def run_in_subprocesses(args: argparse.Namespace) -> list[dict]:
    """Time each method in a process of its own (this script with ``--method``), one after
    the other, so that each row's peak memory is that method's."""
    rows = []
    for name in args.methods:
        cmd = [sys.executable, __file__, "--method", name] + [
            a for a in sys.argv[1:] if a not in args.methods and a != "--methods"
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    """Run every method in a subprocess and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["supervised", "cutmix_seg", "pcr"])
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model",
        default="deeplabv3plus",
        choices=["deeplabv3plus", "vit_dpt"],
        help="the network: a CNN with DeepLabv3+, or a timm ViT with UniMatch V2's DPT",
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument(
        "--checkpointing", action="store_true", help="vit_dpt: recompute the encoder's blocks"
    )
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--crop", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8, help="labelled and unlabelled each")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--prototypes", type=int, default=4)
    parser.add_argument(
        "--sample-grid", type=int, default=32, help="the branch's sampling cell (the demo: 16)"
    )
    parser.add_argument("--loss", default="ce", choices=["ce", "ohem"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time all methods in one process, a step of each in turn (no memory column)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more config overrides, e.g. model.head_channels=64",
    )
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_single(args)))
        return
    rows = run_interleaved(args) if args.interleave else run_in_subprocesses(args)
    by = {r["method"]: r for r in rows}
    network = (
        f"{args.backbone} + DPT{', checkpointing' if args.checkpointing else ''}"
        if args.model == "vit_dpt"
        else f"{args.backbone} OS{args.output_stride}"
    )
    print(
        f"\n{network}, crop {args.crop}, batch {args.batch}+"
        f"{args.batch}, {args.precision}, {rows[0]['device']} ({rows[0]['device_name']}, "
        f"{rows[0]['threads']} threads), torch {rows[0]['torch']}; median of {args.steps} steps"
        f"{'; ' + ' '.join(args.set) if args.set else ''}\n"
    )
    print("| method | step s (median) | min | max | memory MiB | vs cutmix_seg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['median_s'] / by['cutmix_seg']['median_s']:.3f}" if "cutmix_seg" in by else "-"
        memory = "-" if r["memory_mib"] is None else f"{r['memory_mib']:.0f} ({r['memory_kind']})"
        print(
            f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
            f"{memory} | {ratio} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
