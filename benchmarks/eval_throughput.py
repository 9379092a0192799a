"""Evaluation throughput: whole-image and sliding-window inference (windows batched).

Times ``protoseg.inference.infer_logits`` on random images of a fixed size with a
DeepLabv3+ of the chosen backbone, for whole-image inference and for sliding windows at
several window batch sizes; reports images per second (median over repeats).

    python benchmarks/eval_throughput.py --backbone resnet18 --size 256 512 --window 192
    python benchmarks/eval_throughput.py --backbone resnet101s --size 1024 2048 --window 769 \
        --stride 513 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    """Print a Markdown table of images/s per inference mode."""
    import torch

    from protoseg.config import EvalConfig, ModelConfig
    from protoseg.inference import infer_logits
    from protoseg.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--window", type=int, default=192)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    model = (
        create_model(
            ModelConfig(backbone=args.backbone, output_stride=args.output_stride), args.classes
        )
        .to(device)
        .eval()
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    image = torch.randn(1, 3, *args.size, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    modes = [("whole image", EvalConfig(mode="whole"))] + [
        (
            f"sliding {args.window}/{args.stride}, {b} windows/batch",
            EvalConfig(mode="sliding", window=args.window, stride=args.stride, windows_per_batch=b),
        )
        for b in args.batches
    ]
    print(
        f"{args.backbone} OS{args.output_stride}, image {args.size[0]}x{args.size[1]}, "
        f"{device}, {args.precision}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| mode | s / image | images / s |")
    print("|---|---|---|")
    for name, cfg in modes:
        times = []
        for i in range(args.repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                infer_logits(model, image, cfg, args.classes)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up (cudnn autotuning, allocator)
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {1 / median:.2f} |")


if __name__ == "__main__":
    main()
