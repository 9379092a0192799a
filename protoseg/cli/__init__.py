"""The ``protoseg`` command: parses arguments, builds objects, calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protoseg.cli.common import add_command, add_overwrite_flag, guard_outputs

log = logging.getLogger("protoseg")


def _setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ---- data ------------------------------------------------------------------------------------
def cmd_data_synthetic(args: argparse.Namespace) -> int:
    """Write the synthetic dataset in the VOC layout."""
    from protoseg.data import DEFAULT_LABEL_COUNTS, DEFAULT_NUM_TRAIN, generate_synthetic

    counts = (
        [int(x) for x in args.labels.split(",") if x]
        if args.labels is not None
        else list(DEFAULT_LABEL_COUNTS)
    )
    root = generate_synthetic(
        args.out,
        num_train=args.num_train if args.num_train is not None else DEFAULT_NUM_TRAIN,
        num_val=args.num_val,
        image_size=args.image_size,
        label_counts=counts,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"synthetic dataset written to {root} (splits: {', '.join(map(str, counts))}, full)")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    """Random labelled/unlabelled split of a list of names."""
    from protoseg.data import read_split, split_list

    out = Path(args.out)
    # Written only once the list is read; the list itself is never one of the outputs.
    guard_outputs([out / "labeled.txt", out / "unlabeled.txt"], overwrite=True, inputs=[args.list])
    labeled, unlabeled = split_list(
        args.list, args.out, args.num_labeled, args.seed, force=args.overwrite
    )
    print(
        f"{len(read_split(labeled))} labelled and {len(read_split(unlabeled))} unlabelled "
        f"names written to {args.out}"
    )
    return 0


def cmd_data_voc(args: argparse.Namespace) -> int:
    """Build VOC 2012 + SBD's SegmentationClassAug and install the U2PL split lists."""
    from protoseg.data import prepare_voc
    from protoseg.outputs import OutputError, same_file

    for flag, source in (("--voc", args.voc), ("--sbd", args.sbd)):
        if same_file(args.out, source):
            raise OutputError(
                f"--out {args.out} is the {flag} folder; its files would be replaced: "
                "write the prepared set to a folder of its own"
            )
    s = prepare_voc(
        args.voc,
        args.sbd,
        args.out,
        splits_dir=args.splits,
        force=args.overwrite,
        copy_images=args.copy_images,
        workers=args.workers,
    )
    print(
        f"{s.train_aug} train_aug + {s.val} val masks ({s.from_voc} from VOC, {s.from_sbd} "
        f"from SBD) in {s.out_dir / 'SegmentationClassAug'}; JPEGImages: {s.images}; "
        f"{len(s.split_files)} split files installed"
    )
    return 0


def cmd_data_cityscapes(args: argparse.Namespace) -> int:
    """Write *_gtFine_labelTrainIds.png next to the labelIds files; install split lists."""
    from protoseg.data import prepare_cityscapes

    s = prepare_cityscapes(
        args.root, force=args.overwrite, workers=args.workers, splits_dir=args.splits
    )
    print(
        f"labelTrainIds written: {s.written}, kept: {s.kept}; "
        f"{len(s.split_files)} split files installed"
    )
    return 0


# ---- train / eval ----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Train from a YAML config with dotted overrides."""
    from protoseg.config import config_yaml, load_config
    from protoseg.distributed import cleanup
    from protoseg.engine.trainer import Trainer

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from protoseg.engine.checkpoint import resume_path
    from protoseg.engine.runtime import sigterm_as_interrupt
    from protoseg.outputs import check_finished_run

    # Every rank decides alike (one shared run folder), so none waits for a refused one.
    check_finished_run(
        cfg.train.out_dir,
        has_checkpoint=resume_path(cfg.train.resume, cfg.train.out_dir) is not None,
        overwrite=args.overwrite,
    )
    try:
        # A scheduler's SIGTERM saves a checkpoint as Ctrl-C does.
        with sigterm_as_interrupt():
            trainer = Trainer(cfg)
            result = trainer.fit()
    finally:
        cleanup()
    if _rank() == 0:
        # The per-class tables are in the log (and train.log); stdout gets one summary.
        finals = ", ".join(f"{head} head {res.miou:.2f}" for head, res in result.final.items())
        print(f"final mIoU at step {result.steps}: {finals}")
        if result.best is not None:
            print(f"best mIoU {result.best.miou:.2f} at step {result.best_step}")
        print(
            f"outputs in {result.out_dir} (model.pt, best.pt, train.log, checkpoints/, "
            "tensorboard/)"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint or model file on a config's validation split."""
    from protoseg.config import load_config
    from protoseg.data import build_dataset, build_eval_loader, eval_transform
    from protoseg.distributed import cleanup, init_distributed
    from protoseg.inference import evaluate, format_table, load, save_result
    from protoseg.progress import show_progress

    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).is_file():
        # "eval data.root=... --checkpoint m.pt": no config was given, only overrides.
        overrides.insert(0, config)
        config = None
    if config is None:
        from protoseg.config import from_dict, to_dict
        from protoseg.inference import read_model_file

        stored = to_dict(read_model_file(args.checkpoint).config)
        cfg = from_dict(stored, with_method=False, overrides=overrides)
    else:
        cfg = load_config(config, overrides)
    if args.out:
        guard_outputs(
            [args.out],
            args.overwrite,
            models=[args.checkpoint],
            inputs=[config],
            dataset=cfg.data.root,
        )
    dist_info, device = init_distributed(cfg.train.device)
    try:
        predictor = load(args.checkpoint, device=device, head=args.head)
        dataset = build_dataset(cfg.data, "val", eval_transform(cfg.data))
        loader = build_eval_loader(
            dataset, dist_info.rank, dist_info.world_size, workers=min(cfg.data.workers, 4)
        )
        result = evaluate(
            predictor.model,
            loader,
            cfg.data.num_classes,
            cfg.eval,
            device,
            cfg.data.ignore_index,
            progress=show_progress(True) and dist_info.is_main,
        )
    finally:
        cleanup()
    if dist_info.is_main:
        print(format_table(result, cfg.data.class_names))
        if args.out:
            save_result(
                result,
                args.out,
                cfg.data.class_names,
                {"checkpoint": str(args.checkpoint), "head": args.head, "mode": cfg.eval.mode},
            )
            print(f"results written to {args.out}")
    return 0


def cmd_convert_release(args: argparse.Namespace) -> int:
    """Convert one of the PCR authors' MindSpore checkpoints into a protoseg model file."""
    from protoseg.convert.release import main_convert

    guard_outputs([args.out], args.overwrite, inputs=[args.checkpoint])
    return main_convert(args.checkpoint, args.dataset, args.out, args.overwrite)


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the synthetic set, train the methods, compare them."""
    from protoseg.cli.demo import run_demo

    run_demo(
        out=args.out,
        full=args.full,
        methods=args.methods,
        seed=args.seed,
        iterations=args.iterations,
        device=args.device,
        pretrained=args.pretrained,
        jobs=args.jobs,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain a backbone on the synthetic classification set (cached by its settings)."""
    from protoseg.engine.pretrain import PretrainSettings, ensure_pretrained

    chosen = {
        key: getattr(args, key)
        for key in ("backbone", "num_images", "image_size", "epochs", "lr", "seed", "threads")
        if getattr(args, key) is not None
    }
    model_args = _parse_model_args(args.model_arg or [])
    settings = PretrainSettings(**chosen, model_args=model_args)
    result = ensure_pretrained(args.out, settings, args.device, force=args.force)
    state = "reused" if result.reused else f"trained in {result.seconds:.0f} s"
    print(
        f"{result.file} ({state}; held-out accuracy {result.val_accuracy:.2f}%)\n"
        f"train from it with: model.backbone={settings.backbone} model.pretrained={result.file}"
    )
    return 0


def _parse_model_args(pairs: list[str]) -> dict[str, Any]:
    """``pretrain --model-arg`` KEY=VALUE pairs, each value read as YAML (``8``, ``[1, 2]``)."""
    import yaml

    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--model-arg {pair!r}: write KEY=VALUE, e.g. --model-arg depth=6")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


# ---- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every sub-command has --help)."""
    parser = argparse.ArgumentParser(
        prog="protoseg", description="Semi-supervised semantic segmentation (PCR and baselines)."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = add_command(
        data_sub,
        "synthetic",
        cmd_data_synthetic,
        "Write the built-in synthetic dataset (VOC layout, U2PL-format splits).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    # The defaults live in protoseg.data.synthetic; the CLI imports it lazily to start fast.
    p.add_argument("--num-train", type=int, default=None, help="train images (default 256)")
    p.add_argument("--num-val", type=int, default=96)
    p.add_argument("--image-size", type=int, default=96)
    add_overwrite_flag(p, "replace existing split files")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated labelled-set sizes to write splits for (default 16,64)",
    )
    p = add_command(
        data_sub,
        "split",
        cmd_data_split,
        "Random labelled/unlabelled split of a list file (one name per line).",
    )
    p.add_argument("--list", required=True, help="file listing every training name")
    p.add_argument("--num-labeled", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for labeled.txt and unlabeled.txt")
    add_overwrite_flag(p, "replace existing split files")
    p = add_command(
        data_sub,
        "voc",
        cmd_data_voc,
        "Build VOC 2012 + SBD's SegmentationClassAug and install U2PL split lists.",
    )
    p.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (VOCtrainval_11-May-2012.tar)")
    p.add_argument("--sbd", required=True, help="benchmark_RELEASE (SBD's benchmark.tgz)")
    p.add_argument("--out", required=True, help="dataset root to write (data.root)")
    p.add_argument(
        "--splits", default=None, help="U2PL's data/splits folder; pascal/ goes to OUT/splits"
    )
    p.add_argument("--copy-images", action="store_true", help="copy images, do not symlink")
    p.add_argument("--workers", type=int, default=4)
    add_overwrite_flag(p, "rebuild masks, replace split files")
    p = add_command(
        data_sub,
        "cityscapes",
        cmd_data_cityscapes,
        "Write *_gtFine_labelTrainIds.png and install U2PL split lists.",
    )
    p.add_argument("--root", required=True, help="folder with gtFine/ and leftImg8bit/")
    p.add_argument(
        "--splits", default=None, help="U2PL's data/splits folder; cityscapes/ goes to ROOT/splits"
    )
    p.add_argument("--workers", type=int, default=4)
    add_overwrite_flag(p, "rewrite existing labelTrainIds files")

    p = add_command(
        sub,
        "train",
        cmd_train,
        "Train a model from a YAML config (torchrun for many GPUs).",
        overrides=True,
    )
    p.add_argument(
        "config",
        help="YAML config file, or a shipped recipe by name (e.g. synthetic/pcr.yaml, "
        "voc/classic/92/pcr.yaml; see configs/)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint to resume from ('auto' = newest in the run folder)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML) and exit"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain into a run folder that holds a finished run but no checkpoint",
    )

    p = add_command(
        sub,
        "eval",
        cmd_eval,
        "Evaluate a model file on the validation split (of its own config, or of CONFIG).",
        overrides=True,
    )
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML config (data and eval settings); omitted: the model file's own config, "
        "with overrides such as data.root=...",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    p.add_argument("--checkpoint", required=True, help="model.pt, best.pt or a step_*.pt file")
    p.add_argument(
        "--head",
        default="linear",
        help="prediction head: linear, or one the model file holds (e.g. prototype)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    add_overwrite_flag(p, "replace an existing --out file")

    convert = sub.add_parser(
        "convert", help="convert other models' files", description="Convert model files."
    )
    convert_sub = convert.add_subparsers(dest="convert_command", required=True)
    p = add_command(
        convert_sub,
        "release",
        cmd_convert_release,
        "Convert a best.ckpt of the PCR authors' release (MindSpore; MindSpore not needed) "
        "into a protoseg model file.",
    )
    p.add_argument("checkpoint", help="the release's best.ckpt")
    p.add_argument("--dataset", required=True, choices=["voc", "cityscapes"])
    p.add_argument("--out", required=True, help="the protoseg model file to write, e.g. m.pt")
    add_overwrite_flag(p, "replace an existing --out")

    p = add_command(
        sub,
        "demo",
        cmd_demo,
        "Synthetic-data replication: supervised vs cutmix_seg vs pcr, with a report.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument(
        "--full",
        action="store_true",
        help="also run the Table 4 ablations, strong-augmentation variants and "
        "several label fractions (longer)",
    )
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="override the training length")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--pretrained",
        default=None,
        help="backbone weights every run starts from: default, the synthetic pretraining's "
        "(trained into OUT/pretrained on the first run, then reused); a file; or 'none'",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained at once, a process each (default: on a CPU every run, up to "
        "max(3, CPU cores); on CUDA 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per run (default: 1 when several train at once on a CPU); results "
        "depend on it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate OUT/data when it holds a synthetic set of another generator version",
    )

    p = add_command(
        sub,
        "pretrain",
        cmd_pretrain,
        "Pretrain a backbone on the synthetic classification set (ImageNet's stand-in for "
        "the synthetic benchmark); writes timm-loadable safetensors, reused when present.",
    )
    p.add_argument(
        "--out", default="runs/demo/pretrained", help="cache folder (the demo's by default)"
    )
    # The defaults live in PretrainSettings; the CLI imports it lazily to start fast.
    p.add_argument("--backbone", default=None, help="a timm model name (default resnet10t)")
    p.add_argument("--num-images", type=int, default=None, help="training images (12800)")
    p.add_argument("--image-size", type=int, default=None, help="pixels a side (32)")
    p.add_argument("--epochs", type=int, default=None, help="(6)")
    p.add_argument("--lr", type=float, default=None, help="AdamW's peak lr (0.003)")
    p.add_argument("--seed", type=int, default=None, help="draw of the set and init (0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (2); the weights depend on the count, not on the machine's cores",
    )
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="a timm.create_model argument of the backbone (repeatable), e.g. a ViT shrunk to "
        "the crop: --model-arg patch_size=8 --model-arg depth=6; train with the same ones "
        "in model.vit.encoder_args",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="train again even if cached")

    from protoseg.cli.analysis import register

    register(sub)  # predict, export, analyze, sweep
    return parser


def _version() -> str:
    from protoseg import __version__

    return f"protoseg {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``protoseg`` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(_rank())
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input and file-system faults (a full or read-only disk) are reported in one
        # line that names the file and the fix.
        if os.environ.get("PROTOSEG_DEBUG"):
            raise
        print(f"error: {_one_line(exc, args)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException, args: argparse.Namespace) -> str:
    """An error as one line; an OSError as its file (else the command's output) and reason,
    with what to check."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.strerror:
        target = exc.filename or getattr(args, "out", None) or getattr(args, "root", None)
        where = f"{target}: " if target else ""
        return (
            f"{where}{exc.strerror} (errno {exc.errno}); check that the folder is writable "
            "and the disk has room (rerun with PROTOSEG_DEBUG=1 for the traceback)"
        )
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
