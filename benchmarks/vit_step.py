"""Step time and peak memory of the vit_dpt network (DINOv2/DINOv3 + DPT) under the one-GPU
switches: gradient checkpointing, bf16 autocast, fused or explicit attention.

A step is the model alone: forward of a random batch at ``--crop``, a cross-entropy loss
on random labels, backward and an AdamW step (UniMatch V2's optimiser, head at lr x 40).
Each variant runs in its own subprocess, so its peak memory is its own: peak RSS on a CPU,
``torch.cuda.max_memory_allocated`` on CUDA. Medians over ``--steps`` steps after
``--warmup`` untimed ones; random weights (the encoder's values do not change the time).

    python benchmarks/vit_step.py --encoder vit_small_patch14_dinov2 --crop 224 --batch 2
    python benchmarks/vit_step.py --encoder vit_base_patch14_dinov2 --crop 518 --batch 8 \\
        --device cuda
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

# name -> (precision, gradient checkpointing, fused attention)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, True),
    "fp32 explicit attention": ("fp32", False, False),
    "fp32 checkpointing": ("fp32", True, True),
    "bf16": ("bf16", False, True),
    "bf16 checkpointing": ("bf16", True, True),
}


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Time ``variant`` in this process and return its row."""
    import torch
    import torch.nn.functional as F

    from protoseg.config import ModelConfig, ViTConfig
    from protoseg.models import create_model

    precision, checkpointing, fused = VARIANTS[variant]
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    vit = ViTConfig(checkpointing=checkpointing, fused_attention=fused)
    model = create_model(ModelConfig(name="vit_dpt", backbone=args.encoder, vit=vit), args.classes)
    model = model.to(device).train()
    encoder, head = model.param_groups()
    lr = 5e-6
    optimizer = torch.optim.AdamW(
        [{"params": encoder, "lr": lr}, {"params": head, "lr": lr * 40}],
        betas=(0.9, 0.999),
        weight_decay=0.01,
    )
    dtype = torch.bfloat16 if precision == "bf16" else None
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step() -> float:
        x = torch.randn(args.batch, 3, args.crop, args.crop, generator=gen).to(device)
        y = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), generator=gen)
        y = y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)["logits"]
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} (max allocated)"
        where = torch.cuda.get_device_name(device)
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} (peak RSS)"
        where = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "memory_mib": memory,
        "device": where,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_variant(args, args.one)))
        return
    rows = []
    for variant in args.variants:
        argv = [a for a in sys.argv[1:] if a]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--one", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(
        f"{args.encoder} + DPT, crop {args.crop}, batch {args.batch}, {args.classes} classes, "
        f"{first['device']}, torch {first['torch']}; median of {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    print()
    print("| variant | step s (median) | min | max | memory MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} "
            f"| {r['memory_mib']} |"
        )


if __name__ == "__main__":
    main()
