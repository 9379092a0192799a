"""Convert the PCR authors' released MindSpore checkpoints into protoseg model files.

The release (github.com/HeimingX/semi_seg_proto) ships nine ``best.ckpt`` files: VOC
classic 92/183/366/732/1464 labels (21 classes, 4 prototypes per class, no auxiliary
head) and Cityscapes 186/372/744/1488 labels (19 classes, 3 prototypes per class, an
auxiliary head on layer3). Their network is protoseg's default ``DeepLabV3Plus`` tensor
for tensor, so conversion renames tensors and reshapes the prototype bank; anything that
does not fit exactly is refused rather than guessed.

Release names (after the ``module.`` prefix every name carries) and their protoseg places:

==============================  =============================================
release                         protoseg ``DeepLabV3Plus``
==============================  =============================================
encoder.*                       backbone.trunk.* (timm ``resnet101s``)
decoder.aspp.conv1.{1,2}        aspp.pool.{1,2} (image pooling branch)
decoder.aspp.conv{2..5}.*       aspp.branches.{0..3}.* (1x1, rates 12/24/36)
decoder.head.*                  aspp.project.* (1280 -> 256)
decoder.low_conv.*              low_level.*
decoder.classifier.*            classifier.*
auxor.aux.*                     aux.* (Cityscapes only)
proto_net.proto_list (C*M, D)   prototype bank (C, M, D); row c*M + m
==============================  =============================================

MindSpore BatchNorm names map as gamma -> weight, beta -> bias, moving_mean ->
running_mean, moving_variance -> running_var.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from protoseg.config import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    to_dict,
    validate,
)
from protoseg.convert.mindspore_ckpt import read_checkpoint
from protoseg.files import MODEL_FORMAT, CheckpointError, save_file
from protoseg.methods import method_config_class
from protoseg.models import build_head

__all__ = [
    "RELEASES",
    "ReleaseConversionError",
    "ReleaseModel",
    "ReleaseSpec",
    "convert_release",
    "convert_tensors",
    "main_convert",
    "protoseg_name",
    "release_config",
    "write_model_file",
]

RELEASE_REPO = "HeimingX/semi_seg_proto"
# The release's method, as protoseg registers it, and the kind of its prototype head.
RELEASE_METHOD = "pcr"
PROTOTYPE_HEAD = "prototype"
# The release normalises 0-255 pixels with these (its config.yaml); protoseg reads 0-1 pixels.
RELEASE_MEAN_255 = (123.675, 116.28, 103.53)
RELEASE_STD_255 = (58.395, 57.12, 57.375)
PROTOTYPE_KEY = "proto_net.proto_list"
_PREFIX = "module."

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
# The Cityscapes benchmark's colours for the 19 train ids.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


class ReleaseConversionError(CheckpointError):
    """A release checkpoint does not fit protoseg's network, or the conversion was refused."""


@dataclass(frozen=True)
class ReleaseSpec:
    """What distinguishes one dataset's released network and its reported results."""

    dataset: str
    title: str
    num_classes: int
    prototypes_per_class: int
    aux_head: bool
    class_names: tuple[str, ...]
    # Labelled-image counts of the released checkpoints and the mIoU (%) the release's
    # README reports for each ("Ours (this repo.)", linear head).
    labels: tuple[int, ...]
    reported_miou: tuple[float, ...]
    protocol: str


RELEASES: dict[str, ReleaseSpec] = {
    "voc": ReleaseSpec(
        dataset="voc",
        title="PASCAL VOC 2012, classic",
        num_classes=21,
        prototypes_per_class=4,
        aux_head=False,
        class_names=VOC_CLASSES,
        labels=(92, 183, 366, 732, 1464),
        reported_miou=(70.78, 74.65, 76.77, 78.70, 80.18),
        protocol="whole image, single scale",
    ),
    "cityscapes": ReleaseSpec(
        dataset="cityscapes",
        title="Cityscapes",
        num_classes=19,
        prototypes_per_class=3,
        aux_head=True,
        class_names=CITYSCAPES_CLASSES,
        labels=(186, 372, 744, 1488),
        reported_miou=(73.99, 77.10, 78.58, 79.55),
        protocol="769 x 769 sliding window, stride 513",
    ),
}


@dataclass
class ReleaseModel:
    """A converted release checkpoint: protoseg config, network weights and prototype bank."""

    config: Config
    state_dict: dict[str, Tensor]
    # (C, M, D) prototypes, un-normalised as the release stores them.
    prototypes: Tensor
    dataset: str
    source: str


def _spec(dataset: str) -> ReleaseSpec:
    """The release spec of ``dataset``, or an error listing the choices."""
    try:
        return RELEASES[dataset]
    except KeyError:
        choices = ", ".join(RELEASES)
        raise ReleaseConversionError(
            f"unknown release dataset {dataset!r}: choose one of {choices}"
        ) from None


def release_config(dataset: str) -> Config:
    """The protoseg Config of the release's network, data normalisation and evaluation."""
    spec = _spec(dataset)
    voc = dataset == "voc"
    data = DataConfig(
        root="data/VOC2012" if voc else "data/cityscapes",
        layout="voc" if voc else "cityscapes",
        mask_dir="SegmentationClassAug" if voc else "",
        val_split="splits/pascal/val.txt" if voc else "splits/cityscapes/val.txt",
        num_classes=spec.num_classes,
        class_names=list(spec.class_names),
        mean=[round(v / 255.0, 6) for v in RELEASE_MEAN_255],
        std=[round(v / 255.0, 6) for v in RELEASE_STD_255],
        crop_size=513 if voc else 769,
    )
    # The weights come from the converted file: nothing to download when it is loaded.
    model = ModelConfig(
        backbone="resnet101s",
        pretrained="",
        output_stride=8,
        multi_grid=True,
        aspp_channels=256,
        aspp_dilations=[12, 24, 36],
        low_level_channels=256,
        head_channels=256,
        dropout=0.1,
        aux_head=spec.aux_head,
    )
    method = release_method_config(
        confidence_threshold=0.8 if voc else 0.65,
        prototypes={
            "per_class": spec.prototypes_per_class,
            "momentum": 0.99,
            "temperature": 0.1,
        },
    )
    optim = (
        OptimConfig(lr=1e-3, weight_decay=1e-4, decoder_lr_mult=10.0)
        if voc
        else OptimConfig(lr=1e-2, weight_decay=5e-4, decoder_lr_mult=1.0)
    )
    train = TrainConfig(
        epochs=80.0 if voc else 200.0,
        batch_size=16,
        loss="ohem",
        aux_weight=0.4,
        seed=2,
        out_dir=f"runs/release/{dataset}",
    )
    evaluation = (
        EvalConfig(mode="whole", all_heads=True)
        if voc
        else EvalConfig(mode="sliding", window=769, stride=513)
    )
    return validate(Config(data, model, method, optim, train, evaluation))


# ---- names ---------------------------------------------------------------------------------
_BN_LEAVES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_PLAIN_LEAVES = ("weight", "bias")
_MODULE_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    # The release's ResNet uses torchvision's module names, as timm's trunk does.
    (re.compile(r"encoder\.(.+)"), lambda m: f"backbone.trunk.{m[1]}"),
    # Index 0 of the pooling branch is the pool itself in both networks.
    (re.compile(r"decoder\.aspp\.conv1\.(\d+)"), lambda m: f"aspp.pool.{m[1]}"),
    (
        re.compile(r"decoder\.aspp\.conv([2-5])\.(\d+)"),
        lambda m: f"aspp.branches.{int(m[1]) - 2}.{m[2]}",
    ),
    (re.compile(r"decoder\.head\.(\d+)"), lambda m: f"aspp.project.{m[1]}"),
    (re.compile(r"decoder\.low_conv\.(\d+)"), lambda m: f"low_level.{m[1]}"),
    (re.compile(r"decoder\.classifier\.(\d+)"), lambda m: f"classifier.{m[1]}"),
    (re.compile(r"auxor\.aux\.(\d+)"), lambda m: f"aux.{m[1]}"),
)


def _strip_prefix(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def protoseg_name(release_name: str) -> str | None:
    """The protoseg state-dict key of a release tensor name, or None when it has no place.

    Accepts names with or without the release's ``module.`` prefix. The prototype bank
    (``proto_net.proto_list``) is not a network tensor and maps to None here.
    """
    module, _, leaf = _strip_prefix(release_name).rpartition(".")
    if leaf in _BN_LEAVES:
        leaf = _BN_LEAVES[leaf]
    elif leaf not in _PLAIN_LEAVES:
        return None
    for pattern, place in _MODULE_RULES:
        match = pattern.fullmatch(module)
        if match:
            return f"{place(match)}.{leaf}"
    return None


# ---- conversion ----------------------------------------------------------------------------
def _expected_state(dataset: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names, shapes and dtypes of the protoseg network's state dict for a release."""
    return dict(_expected_entries(dataset))


@functools.lru_cache(maxsize=len(RELEASES))
def _expected_entries(dataset: str) -> tuple[tuple[str, tuple[torch.Size, torch.dtype]], ...]:
    from protoseg.models import create_model

    cfg = release_config(dataset)
    # The meta device gives names and shapes without allocating or initialising 62M weights.
    with torch.device("meta"):
        network = create_model(cfg.model, cfg.data.num_classes)
    return tuple((k, (v.shape, v.dtype)) for k, v in network.state_dict().items())


def _looks_like(tensors: Mapping[str, Tensor]) -> str | None:
    """The release dataset whose class count and aux head the checkpoint has, if any."""
    bias = tensors.get("decoder.classifier.8.bias")
    if bias is None or bias.dim() != 1:
        return None
    has_aux = any(k.startswith("auxor.") for k in tensors)
    for name, spec in RELEASES.items():
        if bias.shape[0] == spec.num_classes and has_aux == spec.aux_head:
            return name
    return None


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def convert_tensors(
    tensors: Mapping[str, Tensor], dataset: str, source: str = "<tensors>"
) -> ReleaseModel:
    """Place release tensors (names as in the ``.ckpt``) into protoseg's network and bank.

    Refuses, naming ``source``, any tensor without a place, any shape that differs, and any
    protoseg tensor left unfilled (BatchNorm's ``num_batches_tracked`` counters, which the
    release does not keep, are set to 0).
    """
    spec = _spec(dataset)
    stripped: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        key = _strip_prefix(name)
        if key in stripped:
            raise ReleaseConversionError(
                f"{source}: holds {key!r} both with and without the 'module.' prefix"
            )
        stripped[key] = tensor

    guess = _looks_like(stripped)
    if guess is not None and guess != dataset:
        other = RELEASES[guess]
        raise ReleaseConversionError(
            f"{source}: this is a {other.title} checkpoint ({other.num_classes} classes"
            f"{', auxiliary head' if other.aux_head else ''}), not {spec.title}: "
            f"convert it with --dataset {guess}"
        )

    cfg = release_config(dataset)
    expected = _expected_state(dataset)
    state: dict[str, Tensor] = {}
    placed_from: dict[str, str] = {}
    unplaced: list[str] = []
    mismatched: list[str] = []
    for name, tensor in stripped.items():
        if name == PROTOTYPE_KEY:
            continue
        target = protoseg_name(name)
        if target is None or target not in expected:
            unplaced.append(_PREFIX + name)
            continue
        if target in placed_from:
            raise ReleaseConversionError(
                f"{source}: {name!r} and {placed_from[target]!r} both map to {target!r}"
            )
        shape, dtype = expected[target]
        if tensor.shape != shape:
            mismatched.append(f"{_PREFIX}{name} {tuple(tensor.shape)} (protoseg {tuple(shape)})")
            continue
        if tensor.dtype != dtype and not (tensor.is_floating_point() and dtype.is_floating_point):
            mismatched.append(f"{_PREFIX}{name} dtype {tensor.dtype} (protoseg {dtype})")
            continue
        state[target] = tensor.to(dtype)
        placed_from[target] = name

    net = f"protoseg's DeepLabV3Plus for the {spec.title} release"
    if unplaced:
        raise ReleaseConversionError(
            f"{source}: {len(unplaced)} tensors have no place in {net}: {_listing(unplaced)}. "
            "Only the PCR release's best.ckpt files are supported; check that this is one "
            "and that --dataset is right"
        )
    if mismatched:
        raise ReleaseConversionError(
            f"{source}: {len(mismatched)} tensors differ in shape or type from {net}: "
            f"{_listing(mismatched, 4)}. Check --dataset ({', '.join(RELEASES)})"
        )
    for key, (shape, dtype) in expected.items():
        # The release keeps no update counters; with BN's momentum set they are never read.
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=dtype)
    unfilled = [k for k in expected if k not in state]
    if unfilled:
        raise ReleaseConversionError(
            f"{source}: {len(unfilled)} tensors of {net} are missing from the checkpoint: "
            f"{_listing(unfilled)}. The file is incomplete or from another network"
        )
    ordered = {k: state[k] for k in expected}
    prototypes = _prototypes(stripped.get(PROTOTYPE_KEY), spec, source)
    return ReleaseModel(cfg, ordered, prototypes, dataset, source)


def _prototypes(bank: Tensor | None, spec: ReleaseSpec, source: str) -> Tensor:
    """Reshape the release's (C*M, D) prototype list to protoseg's (C, M, D) bank."""
    c, m, d = spec.num_classes, spec.prototypes_per_class, 512
    if bank is None:
        raise ReleaseConversionError(
            f"{source}: has no prototype bank ({_PREFIX}{PROTOTYPE_KEY}); the PCR release "
            "checkpoints all have one"
        )
    if tuple(bank.shape) != (c * m, d) or not bank.is_floating_point():
        raise ReleaseConversionError(
            f"{source}: {_PREFIX}{PROTOTYPE_KEY} has shape {tuple(bank.shape)} "
            f"({bank.dtype}); the {spec.title} release needs ({c * m}, {d}) floats "
            f"({c} classes x {m} prototypes)"
        )
    # Row c*M + m is prototype m of class c, so a row-major view is the (C, M, D) bank.
    return bank.float().reshape(c, m, d).clone()


def release_method_config(**settings: Any) -> MethodConfig:
    """The ``method:`` section of the release's recipe, through the method registry.

    The converter builds a model file from plain data and the registry's dataclass of
    ``RELEASE_METHOD``; it imports no method module.
    """
    method = method_config_class(RELEASE_METHOD)()
    for key, value in settings.items():
        current = getattr(method, key)
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                setattr(current, sub_key, sub_value)
        else:
            setattr(method, key, value)
    return method


def convert_release(path: str | Path, dataset: str) -> ReleaseModel:
    """Read a release ``best.ckpt`` (MindSpore) and convert it for ``dataset`` (voc|cityscapes)."""
    _spec(dataset)
    tensors = read_checkpoint(path)
    return convert_tensors(tensors, dataset, str(path))


def _palette(dataset: str) -> list[tuple[int, int, int]]:
    from protoseg.data import voc_palette

    return list(CITYSCAPES_PALETTE) if dataset == "cityscapes" else voc_palette(256)


def model_file_payload(release_model: ReleaseModel) -> dict[str, Any]:
    """The protoseg model-file dict (``MODEL_FORMAT``) of a converted release checkpoint.

    Plain data only (tensors, numbers, strings, lists, dicts), as ``read_model_file``
    requires; the prototype head is stored as the PCR method's deployed head is.
    """
    from protoseg import __version__

    cfg = release_model.config
    protos = cfg.method.prototypes
    c, m, d = release_model.prototypes.shape
    state = {"prototypes": release_model.prototypes.clone(), "initialized": torch.tensor(True)}
    head = {
        "kind": PROTOTYPE_HEAD,
        "options": {
            "num_classes": c,
            "per_class": m,
            "dim": d,
            "temperature": float(protos.temperature),
        },
        "state": state,
    }
    # Building the head as inference will (by its kind) checks the bank's layout.
    build_head(torch.nn.Identity(), head)
    return {
        "format": MODEL_FORMAT,
        "version": __version__,
        "config": to_dict(cfg),
        "state_dict": release_model.state_dict,
        "heads": {PROTOTYPE_HEAD: head},
        "class_names": list(cfg.data.class_names),
        "palette": [list(color) for color in _palette(release_model.dataset)],
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "converted_from": {
            "release": RELEASE_REPO,
            "dataset": release_model.dataset,
            "checkpoint": release_model.source,
        },
    }


def write_model_file(release_model: ReleaseModel, out_path: str | Path) -> Path:
    """Write a converted release checkpoint as a protoseg model file (atomically)."""
    return save_file(model_file_payload(release_model), out_path)


def _summary(release_model: ReleaseModel, out: Path) -> list[str]:
    spec = RELEASES[release_model.dataset]
    cfg = release_model.config
    params = sum(
        t.numel()
        for k, t in release_model.state_dict.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    c, m, _ = release_model.prototypes.shape
    table = " / ".join(f"{v:.2f}" for v in spec.reported_miou)
    splits = " / ".join(str(n) for n in spec.labels)
    root = "VOC2012" if spec.dataset == "voc" else "cityscapes"
    return [
        f"converted {release_model.source} -> {out}",
        f"  {spec.title} release: {c} classes, {m} prototypes per class, "
        f"{params:,} network parameters" + (", auxiliary head" if cfg.model.aux_head else ""),
        f"  the release reports mIoU {table} for {splits} labels (linear head, {spec.protocol})",
        f"  evaluate: protoseg eval data.root=/path/to/{root} --checkpoint {out} "
        f"[--head {PROTOTYPE_HEAD}]",
        f"  predict:  protoseg predict IMAGES... --checkpoint {out} --out masks/",
    ]


def main_convert(checkpoint: str, dataset: str, out: str, force: bool) -> int:
    """``protoseg convert release``: convert ``checkpoint`` and write ``out``; returns 0.

    Refuses (ReleaseConversionError, a ValueError the CLI reports in one line) an unknown
    dataset, a missing input, ``out`` equal to the input, ``out`` being a folder, and an
    existing ``out`` unless ``force``. The checks run before the slow conversion.
    """
    _spec(dataset)
    src, dst = Path(checkpoint), Path(out)
    if not src.is_file():
        raise ReleaseConversionError(f"release checkpoint not found: {src}")
    if dst.resolve() == src.resolve() or (dst.exists() and dst.samefile(src)):
        raise ReleaseConversionError(
            f"--out {dst} is the input checkpoint itself; write the model to another file, "
            "e.g. --out model.pt"
        )
    if dst.is_dir():
        raise ReleaseConversionError(f"--out {dst} is a folder; give a file name, e.g. model.pt")
    if dst.exists() and not force:
        raise ReleaseConversionError(f"{dst} already exists; pass --force to overwrite it")
    release_model = convert_release(src, dataset)
    write_model_file(release_model, dst)
    print("\n".join(_summary(release_model, dst)))
    return 0
