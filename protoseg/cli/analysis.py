"""The analysis sub-commands of ``protoseg``: predict, export, analyze, sweep.

Each command parses its arguments and calls one library function; ``register`` adds them
to the CLI's sub-parsers (``protoseg.cli`` calls it).
"""

from __future__ import annotations

import argparse
import dataclasses

from protoseg.cli.common import add_command, add_overwrite_flag, guard_outputs
from protoseg.config import EvalConfig


def _eval_config(args: argparse.Namespace, base: EvalConfig) -> EvalConfig:
    """The checkpoint's evaluation protocol with the command line's mode/flip/scales on top."""
    scales = base.scales
    if args.scales:
        try:
            scales = [float(s) for s in args.scales.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--scales {args.scales!r}: give numbers like 0.75,1,1.25") from None
    return dataclasses.replace(
        base, mode=args.mode or base.mode, flip=args.flip or base.flip, scales=scales
    )


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict masks and overlays for image files and folders."""
    from protoseg.analysis.infer import find_images, predict_paths
    from protoseg.inference import load

    find_images(args.inputs, args.recursive)  # fail on empty inputs before loading a model
    predictor = load(args.checkpoint, device=args.device, head=args.head)
    summary = predict_paths(
        predictor,
        args.inputs,
        args.out,
        _eval_config(args, predictor.config.eval),
        args.batch_size,
        args.recursive,
        overlays=not args.no_overlay,
        overwrite=args.overwrite,
    )
    print(
        f"{len(summary.masks)} masks written to {args.out}"
        + (f" (overlays in {args.out}/overlay)" if summary.overlays else "")
    )
    for path, reason in summary.failed:
        print(f"skipped {path}: {reason}")
    return 1 if summary.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the deployed network to ONNX or TorchScript."""
    from protoseg.analysis.export import check_export_target, export_model, sidecar_path
    from protoseg.inference import load

    check_export_target(args.checkpoint, args.out, args.overwrite)
    predictor = load(args.checkpoint, device="cpu", head="linear")
    path = export_model(predictor, args.format, args.out, args.opset)
    print(f"{args.format} model written to {path} (metadata: {sidecar_path(path)})")
    return 0


def _split_names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes {text!r}: give class ids like 1,2,3") from None


def cmd_discrimination(args: argparse.Namespace) -> int:
    """Table 5: LDA inter-/intra-class feature traces per checkpoint."""
    from protoseg.analysis.discrimination import discrimination_table, format_markdown, write_table
    from protoseg.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    from protoseg.analysis.discrimination import table_paths

    guard_outputs(
        table_paths(args.out),
        args.overwrite,
        models=args.checkpoint,
        inputs=[args.config],
        dataset=cfg.data.root,
    )
    rows = discrimination_table(
        args.checkpoint,
        cfg,
        _split_names(args.names),
        args.pixels_per_class,
        _classes(args.classes),
        args.seed,
        args.device,
        args.max_images,
        args.l2_normalize,
    )
    md, csv_path = write_table(rows, args.out)
    print(format_markdown(rows))
    print(f"written to {md} and {csv_path}")
    return 0


def cmd_tsne(args: argparse.Namespace) -> int:
    """Figure 2: t-SNE of sampled pixel features, one panel per checkpoint."""
    from protoseg.analysis.tsne import tsne_figure
    from protoseg.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    guard_outputs(
        [args.out],
        args.overwrite,
        models=args.checkpoint,
        inputs=[args.config],
        dataset=cfg.data.root,
    )
    path = tsne_figure(
        args.checkpoint,
        cfg,
        args.out,
        _split_names(args.names),
        _classes(args.classes),
        args.pixels_per_class,
        args.perplexity,
        args.seed,
        args.device,
        args.max_images,
    )
    print(f"t-SNE figure written to {path}")
    return 0


def cmd_qualitative(args: argparse.Namespace) -> int:
    """Figures 4-5: image / ground truth / predictions grid."""
    from protoseg.analysis.qualitative import qualitative_figure
    from protoseg.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    guard_outputs(
        [args.out],
        args.overwrite,
        models=args.checkpoint,
        inputs=[args.config],
        dataset=cfg.data.root,
    )
    path = qualitative_figure(
        args.checkpoint,
        cfg,
        args.out,
        _split_names(args.names),
        _split_names(args.images),
        args.count,
        args.seed,
        args.device,
        args.head,
    )
    print(f"qualitative grid written to {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train one run per value of a swept key and tabulate the final mIoU."""
    from protoseg.cli.sweep import plan_sweep, run_sweep, sweep_commands, write_report

    plan = plan_sweep(args.config, args.overrides, args.out)
    if args.print_commands:
        print("\n".join(sweep_commands(plan, args.nproc)))
        return 0
    rows = run_sweep(plan, args.nproc)
    paths = write_report(plan, rows)
    print(paths[1].read_text(), end="")
    print(f"written to {', '.join(map(str, paths))}")
    return 0 if all(r.status == "done" for r in rows) else 1


def _features_args(p: argparse.ArgumentParser, pixels: int) -> None:
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        help="one or more model.pt / best.pt / step_*.pt files",
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML config whose validation split is sampled (a path or a shipped recipe name)",
    )
    p.add_argument("--names", default=None, help="comma-separated names, one per checkpoint")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: all)")
    p.add_argument(
        "--pixels-per-class",
        type=int,
        default=pixels,
        help=f"labelled pixels sampled per class (default {pixels})",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="only read the first N validation images (faster)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel draw")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def register(sub: argparse._SubParsersAction) -> None:
    """Add predict, export, analyze {discrimination,tsne,qualitative} and sweep to the CLI."""
    p = add_command(
        sub,
        "predict",
        cmd_predict,
        "Predict class masks for image files or folders (palette PNGs + overlays). "
        "Unreadable images are skipped with a warning; the exit code is then 1.",
    )
    p.add_argument("inputs", nargs="+", help="image files (jpg/jpeg/png/bmp) or folders")
    p.add_argument("--checkpoint", required=True, help="model.pt, best.pt or a step_*.pt file")
    p.add_argument("--out", required=True, help="output folder for <name>.png masks")
    p.add_argument(
        "--head",
        default="linear",
        help="prediction head: linear, or one the model file holds (e.g. prototype)",
    )
    p.add_argument(
        "--mode",
        default=None,
        choices=["whole", "sliding"],
        help="inference protocol (default: the checkpoint's eval.mode)",
    )
    p.add_argument("--flip", action="store_true", help="add horizontally flipped views")
    p.add_argument("--scales", default=None, help="test-time scales, e.g. 0.75,1,1.25")
    p.add_argument(
        "--batch-size", type=int, default=1, help="images of equal size predicted together"
    )
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument("--no-overlay", action="store_true", help="write masks only")
    p.add_argument(
        "--overwrite", action="store_true", help="replace masks/overlays that already exist"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    p = add_command(
        sub,
        "export",
        cmd_export,
        "Export the network (linear head) to ONNX or TorchScript: normalised "
        "(B,3,H,W) in, (B,C,H,W) logits out, dynamic sizes; writes <file>.json metadata.",
    )
    p.add_argument("--checkpoint", required=True, help="model.pt, best.pt or a step_*.pt file")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    add_overwrite_flag(p, "replace an existing output file")

    analyze = sub.add_parser(
        "analyze",
        help="feature and prediction analyses (paper figures)",
        description="Feature and prediction analyses (paper figures).",
    )
    a_sub = analyze.add_subparsers(dest="analyze_command", required=True)
    p = add_command(
        a_sub,
        "discrimination",
        cmd_discrimination,
        "Table 5: LDA traces tr(S_b), tr(S_w) and their ratio of decoder features at "
        "sampled labelled validation pixels, one column per checkpoint.",
        overrides=True,
    )
    _features_args(p, pixels=1000)
    p.add_argument(
        "--l2-normalize",
        action="store_true",
        help="L2-normalise features first (the prototypes' cosine space)",
    )
    p.add_argument("--out", required=True, help="folder for discrimination.md / .csv")
    add_overwrite_flag(p, "replace existing discrimination.md / .csv")

    p = add_command(
        a_sub,
        "tsne",
        cmd_tsne,
        "Figure 2: t-SNE of sampled pixel features, one panel per checkpoint.",
        overrides=True,
    )
    _features_args(p, pixels=300)
    p.add_argument(
        "--perplexity", type=float, default=None, help="t-SNE perplexity (default min(30, (N-1)/3))"
    )
    p.add_argument("--out", required=True, help="output PNG file")
    add_overwrite_flag(p, "replace an existing --out file")

    p = add_command(
        a_sub,
        "qualitative",
        cmd_qualitative,
        "Figures 4-5: grid of image / ground truth / each checkpoint's prediction.",
        overrides=True,
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    p.add_argument("--checkpoint", nargs="+", required=True, help="one or more model files")
    p.add_argument("--config", required=True, help="YAML config (validation split, eval mode)")
    p.add_argument("--names", default=None, help="comma-separated column names")
    p.add_argument("--images", default=None, help="comma-separated validation image names")
    p.add_argument("--count", type=int, default=4, help="random images when --images is unset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--head",
        default="linear",
        help="prediction head: linear, or one the model file holds (e.g. prototype)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output PNG file")
    add_overwrite_flag(p, "replace an existing --out file")

    p = add_command(
        sub,
        "sweep",
        cmd_sweep,
        "Train one run per value of one key (key=v1,v2,...) into <out>/<key>=<value> and "
        "tabulate the final mIoU (sweep.csv, sweep.md, sweep.png). Finished runs are "
        "not retrained.",
        overrides=True,
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "overrides",
        nargs="+",
        help="dotted overrides; exactly one lists several values, e.g. "
        "method.confidence_threshold=0.7,0.8,0.9",
    )
    p.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print the torchrun command lines instead of training",
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="processes (GPUs) per run; > 1 launches torchrun"
    )
