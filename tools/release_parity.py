"""Evidence that converted PCR release checkpoints compute what the release computes.

Not run by CI: it needs MindSpore (not a protoseg dependency) in a separate Python and a
checkout of the release's code, which protoseg does not copy. The script

1. builds the release's network in MindSpore from ``--release-src`` (its own
   ``core.models.model_helper.ModelBuilder`` and ``experiments/*/ours/config.yaml``),
   fills every tensor with random values (BatchNorm statistics included, so that swapped
   names would show), saves it with ``mindspore.save_checkpoint`` under the release's
   ``module.`` names, and runs one random image through it (eval mode, prototype head on);
2. converts that checkpoint with ``protoseg.convert.release.main_convert``, loads the
   model file with ``protoseg.inference.load`` and runs the same image;
3. prints the max abs difference of the linear logits, the 512-d features, the prototype
   logits (classified at the input size, as the release does) and the auxiliary logits,
   next to the largest reference value and the argmax agreement, for each dataset; once
   as converted and once with the stem max-pool padded as MindSpore's ``pad_mode='same'``
   pads it (extra row/column at the end; it differs from timm's padding=1 only when the
   stem output is even, e.g. ``--size 320``; odd sizes such as 321 or 513 agree);
4. checks the other direction: a file written by ``protoseg.convert.write_checkpoint``
   is loaded by ``mindspore.load_checkpoint``.

It also writes the release's tensor names and shapes (``tests/data/release_names_*.txt``).

Usage (MindSpore needs numpy < 2)::

    python3 -m venv /tmp/msvenv && /tmp/msvenv/bin/pip install mindspore "numpy<2" pyyaml
    python3 tools/release_parity.py --release-src /path/to/semi_seg_proto \\
        --mindspore-python /tmp/msvenv/bin/python --work /tmp/parity --size 321 \\
        --names-dir tests/data

The table is printed and the full numbers are written to ``<work>/parity_report.json``.

Two compatibility shims are applied to the release code, each computing the same function:
``ops.ResizeBilinear`` (removed in MindSpore 2.x) is rebuilt on ``ops.ResizeBilinearV2``
with the same ``align_corners``, and on CPU, where MindSpore has no Einsum kernel, the
prototype head's ``einsum("nd,md->nm")`` is replaced by a matrix product. The ``turtle``
module, which the release imports without using, is stubbed where tkinter is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

RELEASE_CONFIGS = {
    "voc": "experiments/pascal/92/ours/config.yaml",
    "cityscapes": "experiments/cityscapes/186/ours/config.yaml",
}
NAMES_HEADER = (
    "# Tensor names and shapes of the PCR release's {dataset} network as its MindSpore code\n"
    "# builds them ({config}), with the 'module.' prefix of the released best.ckpt files.\n"
    "# Written by tools/release_parity.py (MindSpore {version}).\n"
)


# ---- stage 1 and 4: inside the MindSpore interpreter ------------------------------------
def _import_release(release_src: Path) -> Any:
    """Import the release's ModelBuilder with the shims this MindSpore needs."""
    try:
        import turtle  # noqa: F401  (the release imports it without using it)
    except ImportError:
        # turtle needs tkinter, absent from many servers; the name is unused.
        sys.modules["turtle"] = types.SimpleNamespace(forward=None)  # type: ignore[assignment]
    import mindspore.ops as ops

    if not hasattr(ops, "ResizeBilinear"):

        class ResizeBilinear:
            """MindSpore 1.x's ResizeBilinear((h, w), align_corners) on top of V2."""

            def __init__(self, size: tuple[int, int], align_corners: bool = False) -> None:
                self.size = tuple(int(s) for s in size)
                self.op = ops.ResizeBilinearV2(align_corners=align_corners)

            def __call__(self, x: Any) -> Any:
                return self.op(x, self.size)

        ops.ResizeBilinear = ResizeBilinear
    sys.path.insert(0, str(release_src))
    from core.models.model_helper import ModelBuilder

    return ModelBuilder


def _randomize(net: Any, seed: int) -> int:
    """Fill every tensor with random values of a sensible scale; return the weight count."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    trainable = 0
    for name, param in net.parameters_and_names():
        shape = tuple(param.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" and ".bn3." in name:
            # The last BN of each residual branch scaled down (as zero-init-residual does
            # fully), so that logits stay near real magnitudes through 33 blocks.
            value = rng.uniform(0.1, 0.3, shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("beta", "moving_mean", "bias"):
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            value = rng.normal(0.0, 1.0, shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
        if param.requires_grad:
            trainable += int(np.prod(shape))
    return trainable


def stage_mindspore(args: argparse.Namespace) -> None:
    """Build, randomise, save and run the release network for each dataset."""
    import mindspore as ms
    import yaml

    ms.set_context(mode=ms.PYNATIVE_MODE)
    builder = _import_release(Path(args.release_src))
    work = Path(args.work)
    rng = np.random.default_rng(args.seed)
    image = rng.normal(0.0, 1.0, (1, 3, args.size, args.size)).astype(np.float32)
    np.save(work / "image.npy", image)
    report: dict[str, Any] = {"mindspore": ms.__version__}
    for dataset in args.datasets:
        cfg_path = Path(args.release_src) / RELEASE_CONFIGS[dataset]
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["net"]["sync_bn"] = False  # as the release's eval.py does
        net = builder(cfg["net"], "parity")
        net.set_train(False)
        if ms.get_context("device_target") == "CPU":
            net.proto_net.einsum = lambda xs: ops_matmul_t(xs[0], xs[1])
        trainable = _randomize(net, args.seed)
        named = [(f"module.{name}", p) for name, p in net.parameters_and_names()]
        ms.save_checkpoint(
            [{"name": n, "data": p} for n, p in named], str(work / f"{dataset}.ckpt")
        )
        np.savez(work / f"{dataset}_params.npz", **{n: p.asnumpy() for n, p in named})
        names_file = (
            Path(args.names_dir) / f"release_names_{dataset}.txt" if args.names_dir else None
        )
        if names_file is not None:
            lines = [f"{n} {','.join(str(d) for d in p.shape)}" for n, p in named]
            header = NAMES_HEADER.format(
                dataset=dataset, config=RELEASE_CONFIGS[dataset], version=ms.__version__
            )
            names_file.write_text(header + "\n".join(lines) + "\n")
        out = net(ms.Tensor(image), eval=True, output_proto=True)
        arrays = {k: v.asnumpy() for k, v in out.items()}
        np.savez(work / f"{dataset}_mindspore.npz", **arrays)
        report[dataset] = {
            "tensors": len(named),
            "trainable_parameters": trainable,
            "outputs": {k: list(v.shape) for k, v in arrays.items()},
        }
    (work / "mindspore_report.json").write_text(json.dumps(report, indent=1))


def ops_matmul_t(x: Any, protos: Any) -> Any:
    """x @ protos.T: the release's einsum('nd,md->nm') without an Einsum kernel."""
    import mindspore.ops as ops

    return ops.matmul(x, protos.T)


def stage_check_writer(args: argparse.Namespace) -> None:
    """Load protoseg's written checkpoint with MindSpore and compare with the expected arrays."""
    import mindspore as ms

    work = Path(args.work)
    loaded = ms.load_checkpoint(str(work / "writer.ckpt"))
    expected = np.load(work / "writer_expected.npz")
    result = {}
    for name in expected.files:
        got = loaded[name].asnumpy()
        want = expected[name]
        same = got.shape == want.shape and np.array_equal(got.astype(want.dtype), want)
        result[name] = {"shape": list(got.shape), "dtype": str(loaded[name].dtype), "equal": same}
    (work / "writer_report.json").write_text(json.dumps(result, indent=1))


# ---- stages 2 and 4: in protoseg's interpreter (torch) ----------------------------------
def _same_maxpool(trunk: Any) -> None:
    """Swap timm's max-pool for MindSpore's pad_mode='same' (extra padding at the end)."""
    import torch.nn.functional as F
    from torch import nn

    class SameMaxPool(nn.Module):
        def forward(self, x: Any) -> Any:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads, value=float("-inf"))
            return F.max_pool2d(x, 3, 2)

    trunk.maxpool = SameMaxPool()


def _protoseg_outputs(model_file: Path, image: Any, same_maxpool: bool) -> dict[str, Any]:
    """Linear logits (stride 4), features and prototype logits (input size), aux logits."""
    import torch
    import torch.nn.functional as F

    from protoseg.inference import load

    predictor = load(model_file, device="cpu", head="prototype")
    segmenter = predictor.model
    network, bank = segmenter.network, segmenter.bank
    if same_maxpool:
        _same_maxpool(network.backbone.trunk)
    with torch.no_grad():
        out = network(image)
        features = F.interpolate(
            out["features"], size=image.shape[-2:], mode="bilinear", align_corners=True
        )
        result = {
            "pred": network.classify(out["features"]),
            "rep_clf": features,
            # The release classifies every pixel of the upsampled features.
            "proto": bank.logits(features),
            # protoseg's deployed prototype head: classify at stride 4, then upsample.
            "proto_deployed": segmenter(image)["logits"],
        }
        if network.aux is not None:
            result["aux"] = network.aux(network.backbone(image)[1])
    return {k: v.numpy() for k, v in result.items()}


def _compare(ms_out: dict[str, Any], pt_out: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for key, ours in pt_out.items():
        ref = ms_out["proto" if key == "proto_deployed" else key]
        diff = float(np.abs(ours - ref).max())
        row = {"max_abs_diff": diff, "max_abs_value": float(np.abs(ref).max())}
        if key in ("pred", "proto", "proto_deployed", "aux"):
            row["argmax_agreement"] = float((ours.argmax(1) == ref.argmax(1)).mean())
        rows[key] = row
    return rows


def _check_writer(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from protoseg.convert import write_checkpoint

    gen = torch.Generator().manual_seed(args.seed)
    tensors = {
        "float32": torch.randn(3, 4, generator=gen),
        "float16": torch.randn(5, generator=gen).half(),
        "float64": torch.randn(2, 2, generator=gen).double(),
        "int32": torch.arange(-3, 3, dtype=torch.int32),
        "int64": torch.tensor([[1 << 40, -7]]),
        "uint8": torch.arange(0, 250, 50, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        # Written as several slices, as MindSpore splits large tensors.
        "sliced": torch.randn(10, 7, generator=gen),
    }
    work = Path(args.work)
    write_checkpoint(tensors, work / "writer.ckpt", slice_bytes=64)
    np.savez(work / "writer_expected.npz", **{k: v.numpy() for k, v in tensors.items()})
    _run_mindspore(args, "check-writer")
    return json.loads((work / "writer_report.json").read_text())


def _run_mindspore(args: argparse.Namespace, stage: str) -> None:
    command = [
        args.mindspore_python,
        str(Path(__file__).resolve()),
        "--stage",
        stage,
        "--release-src",
        str(args.release_src),
        "--work",
        str(args.work),
        "--size",
        str(args.size),
        "--seed",
        str(args.seed),
        "--datasets",
        *args.datasets,
    ]
    if args.names_dir:
        command += ["--names-dir", str(Path(args.names_dir).resolve())]
    # The release's modules import as a package from its root, so run from there.
    subprocess.run(command, check=True, cwd=args.work)


def stage_main(args: argparse.Namespace) -> None:
    """Run everything and print the parity table."""
    import torch

    from protoseg.convert.mindspore_ckpt import read_checkpoint
    from protoseg.convert.release import main_convert

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_mindspore:
        _run_mindspore(args, "mindspore")
    ms_report = json.loads((work / "mindspore_report.json").read_text())
    image = torch.from_numpy(np.load(work / "image.npy"))
    report: dict[str, Any] = {"mindspore": ms_report["mindspore"], "size": args.size}
    for dataset in args.datasets:
        ckpt = work / f"{dataset}.ckpt"
        model_file = work / f"{dataset}_model.pt"
        # The reader against MindSpore's own writer: every tensor, bit for bit.
        ours = read_checkpoint(ckpt)
        theirs = np.load(work / f"{dataset}_params.npz")
        reader_equal = sorted(ours) == sorted(theirs.files) and all(
            np.array_equal(ours[n].numpy(), theirs[n]) for n in theirs.files
        )
        main_convert(str(ckpt), dataset, str(model_file), force=True)
        ms_out = dict(np.load(work / f"{dataset}_mindspore.npz"))
        entry: dict[str, Any] = {
            "mindspore_build": ms_report[dataset],
            "reader_bitwise_equal": reader_equal,
        }
        for variant, same in (("protoseg", False), ("protoseg_same_maxpool", True)):
            entry[variant] = _compare(ms_out, _protoseg_outputs(model_file, image, same))
        report[dataset] = entry
    report["writer_loaded_by_mindspore"] = _check_writer(args)
    (work / "parity_report.json").write_text(json.dumps(report, indent=1))
    print(_table(report, args.datasets))


_LABELS = {
    "pred": "linear logits (stride 4)",
    "aux": "aux logits (stride 8)",
    "rep_clf": "512-d features (input size)",
    "proto": "prototype logits (input size)",
    "proto_deployed": "prototype head as deployed",
}


def _table(report: dict[str, Any], datasets: list[str]) -> str:
    """The parity numbers as a plain-text table."""
    lines = [
        f"MindSpore {report['mindspore']}, input 1x3x{report['size']}x{report['size']}",
        f"{'dataset':<11}{'variant':<22}{'output':<31}{'max|diff|':>11}{'max|ref|':>11}"
        f"{'argmax':>9}",
    ]
    for dataset in datasets:
        entry = report[dataset]
        for variant, title in (
            ("protoseg", "as converted"),
            ("protoseg_same_maxpool", "MS max-pool pad"),
        ):
            for key, row in entry[variant].items():
                agree = row.get("argmax_agreement")
                lines.append(
                    f"{dataset:<11}{title:<22}{_LABELS[key]:<31}{row['max_abs_diff']:>11.3g}"
                    f"{row['max_abs_value']:>11.3g}"
                    + (f"{agree * 100:>8.3f}%" if agree is not None else "")
                )
        build = entry["mindspore_build"]
        lines.append(
            f"{dataset:<11}reader bit-exact on MindSpore's file: {entry['reader_bitwise_equal']}; "
            f"{build['tensors']} tensors, {build['trainable_parameters']:,} trainable parameters"
        )
    writer = report["writer_loaded_by_mindspore"]
    equal = sum(1 for row in writer.values() if row["equal"])
    lines.append(f"writer: {equal}/{len(writer)} tensors loaded back equal by mindspore")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments and run the requested stage."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release-src", required=True, help="checkout of the PCR release")
    parser.add_argument("--mindspore-python", default="python3", help="Python with MindSpore")
    parser.add_argument("--work", default="/tmp/protoseg_parity", help="scratch folder")
    parser.add_argument("--size", type=int, default=321, help="square input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=list(RELEASE_CONFIGS))
    parser.add_argument("--names-dir", default=None, help="write release_names_*.txt here")
    parser.add_argument("--skip-mindspore", action="store_true", help="reuse stage-1 outputs")
    parser.add_argument(
        "--stage",
        default="main",
        choices=["main", "mindspore", "check-writer"],
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    # Stages run in other working folders, so every path is made absolute first.
    args.release_src = str(Path(args.release_src).resolve())
    args.work = str(Path(args.work).resolve())
    {"main": stage_main, "mindspore": stage_mindspore, "check-writer": stage_check_writer}[
        args.stage
    ](args)


if __name__ == "__main__":
    main()
