"""Typed configuration: dataclasses loaded from YAML, validated at load, overridable by dotted keys.

A YAML file may name parent files under ``base:`` (a path or a list of paths, relative to
the file); parents are merged first, in order, then the file itself, then CLI overrides.
Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    """Where the images are and how they are read and augmented."""

    root: str = MISSING
    # Reader of the on-disk layout: "voc", "cityscapes" or "folder" (see protoseg.data.LAYOUTS).
    layout: str = "voc"
    # Sub-folders of ``root``; empty means the layout's default.
    image_dir: str = ""
    mask_dir: str = ""
    # Split files in the U2PL format; relative paths are taken from ``root``.
    labeled_split: str = "splits/labeled.txt"
    unlabeled_split: str = ""
    val_split: str = "splits/val.txt"
    num_classes: int = 21
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = 255
    # Map Cityscapes *_labelIds.png to train ids when no *_labelTrainIds.png exists.
    map_label_ids: bool = True
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    crop_size: int = 513
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # How the random scale is drawn from scale_range: "uniform" over [min, max], or "split"
    # (U2PL's RandResize and the release): U[min, 1] or U[1, max] with probability 1/2 each,
    # so half of the crops are zoomed out whatever the range's width.
    scale_sampling: str = "uniform"
    hflip: bool = True
    # The training "epoch" runs over this set; the other list is repeated to match.
    epoch_over: str = "unlabeled"
    # Validate every file of every split before training starts (slow on huge sets).
    check_files: bool = True
    workers: int = 4
    # Keep each image and mask in memory, decoded and checked, after its first read: for small
    # sets read many times (the synthetic benchmark), where decoding is a tenth of a CPU step.
    # Every loader worker and process holds its own copy: leave it off for VOC-sized sets.
    cache_images: bool = False
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2


@dataclass
class ViTConfig:
    """Settings only the ``vit_dpt`` network has: a timm ViT encoder and UniMatch V2's DPT."""

    # 0-based encoder blocks whose (normed) tokens feed the DPT's four levels, shallow to
    # deep; empty = UniMatch V2's choice by depth (12: 2,5,8,11; 24: 4,11,17,23; 40:
    # 9,19,29,39; other depths: the last block of each quarter).
    blocks: list[int] = field(default_factory=list)
    # DPT widths; 0 / empty = UniMatch V2's for the encoder width (384: 64 and 48,96,192,384;
    # 768: 128 and 96,192,384,768; 1024: 256 and 256,512,1024,1024; 1536: 384 and 1536 x 4).
    features: int = 0
    out_channels: list[int] = field(default_factory=list)
    # Recompute each encoder block in the backward pass (timm's set_grad_checkpointing):
    # activation memory of one block instead of all, for about a third more step time.
    checkpointing: bool = False
    # Attention through F.scaled_dot_product_attention (timm's fused path); False runs the
    # explicit softmax(q k^T) v, as UniMatch V2's code does without xFormers.
    fused_attention: bool = True
    # How DINOv2's absolute position embeddings follow a patch grid other than 37 x 37:
    # "timm" (bicubic to the grid, antialiased) or "dinov2" (Meta's code, which UniMatch V2
    # runs: bicubic by the factor (grid + 0.1) / 37, no antialias). Equal at 518 x 518.
    position_resize: str = "timm"
    # Extra keyword arguments for timm.create_model of the encoder (e.g. drop_path_rate, or
    # embed_dim/depth/num_heads for a small test encoder).
    encoder_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The segmentation network."""

    name: str = "deeplabv3plus"
    # A timm name: a CNN for deeplabv3plus, a ViT (e.g. vit_base_patch14_dinov2) for vit_dpt.
    backbone: str = "resnet101s"
    # "" = random init; "imagenet" = the timm hub weights of ``backbone``; a timm tag such as
    # "resnet101s.gluon_in1k"; or a local file path (.pth/.bin/.safetensors).
    pretrained: str = ""
    output_stride: int = 8
    # Dilations of layer4 multiplied by (1, 2, 4) as in the release (4/8/16 at stride 8).
    multi_grid: bool = True
    aspp_channels: int = 256
    aspp_dilations: list[int] = field(default_factory=lambda: [12, 24, 36])
    low_level_channels: int = 256
    head_channels: int = 256
    dropout: float = 0.1
    aux_head: bool = False
    # Convert BatchNorm to SyncBatchNorm when training distributed on CUDA.
    sync_bn: bool = True
    # Settings of the vit_dpt network (unused by deeplabv3plus).
    vit: ViTConfig = field(default_factory=ViTConfig)


@dataclass
class MethodConfig:
    """The base of every method's hyper-parameter dataclass (``method:`` in the YAML).

    A method declares its own subclass next to its code and registers it with
    ``protoseg.methods.register_method``; the ``method:`` section is validated against the
    dataclass of the method that ``method.name`` names.
    """

    name: str = "supervised"

    def check(self) -> None:
        """Raise ValueError for values that types alone cannot rule out (subclasses extend)."""


@dataclass
class WarmupSettings:
    """Mixed into a method's config that has a supervised warm-up (``method.warmup_epochs``);
    ``protoseg.methods.common.MethodBase`` derives the warm-up's steps from it."""

    # Supervised-only training before any unlabelled loss, in epochs of the epoch set.
    warmup_epochs: float = 0.0


# Finds the config dataclass of a method by name. The method registry lives with the
# methods (``protoseg.methods.registry``), which installs its lookup here when imported;
# this module imports no other layer of protoseg.
MethodConfigLookup = Callable[[str], "type[MethodConfig]"]
_method_lookup: list[MethodConfigLookup] = []


def use_method_configs(lookup: MethodConfigLookup) -> None:
    """Resolve ``method.name`` through ``lookup`` from now on (the methods' registry)."""
    _method_lookup[:] = [lookup]


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the registered method ``name`` (ConfigError if unknown)."""
    if not _method_lookup:
        raise ConfigError(
            f"method.name={name!r}: no method registry is loaded; import protoseg.methods "
            "(protoseg.load_config and the CLI do) before loading a config"
        )
    return _method_lookup[0](name)


@dataclass
class OptimConfig:
    """SGD or AdamW with a per-step poly schedule; lr is stated for the total batch."""

    # "sgd" (the PCR release) | "adamw" (UniMatch V2 on DINOv2).
    name: str = "sgd"
    # The encoder's lr; the decoder and heads train at lr x decoder_lr_mult.
    lr: float = 1e-3
    # On every parameter (neither release exempts norms, biases or embeddings).
    weight_decay: float = 1e-4
    # SGD only.
    momentum: float = 0.9
    # AdamW only: the moment decay rates (UniMatch V2: 0.9, 0.999).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    decoder_lr_mult: float = 10.0
    poly_power: float = 0.9
    # Freeze the encoder: it gets no gradient and no optimiser group (UniMatch V2's
    # lock_backbone). The Trainer freezes it when it builds the network, before the
    # method and DDP see it.
    lock_backbone: bool = False


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: float = 80.0
    # Overrides ``epochs`` when > 0.
    iterations: int = 0
    # Total batch over all processes, for labelled and unlabelled data each.
    batch_size: int = 16
    # Largest batch one device runs at once; 0 = batch_size / world size (no accumulation).
    max_device_batch: int = 0
    loss: str = "ohem"
    ohem_threshold: float = 0.7
    # The OHEM floor per image: a call on B images keeps at least B x this many pixels (the
    # release's 100000 per GPU batch of 2 crops), so the loss does not depend on how the
    # batch is split over processes and accumulation steps.
    ohem_min_kept: int = 50000
    aux_weight: float = 0.4
    seed: int = 2
    deterministic: bool = False
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = True
    # "" = runs/<config path without .yaml> (runs/default without a config file).
    out_dir: str = ""
    checkpoint_every: int = 1000
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 20
    # "auto": resume from the newest checkpoint in out_dir if there is one.
    resume: str = "auto"
    # What a non-finite loss does: "stop" (keep the last good checkpoint) or "skip" the step.
    on_nonfinite: str = "stop"
    progress: bool = True

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the run: ``iterations``, else ``epochs`` of ``steps_per_epoch``."""
        return self.iterations or max(1, int(round(self.epochs * steps_per_epoch)))


@dataclass
class EvalConfig:
    """The evaluation protocol."""

    mode: str = "whole"
    window: int = 769
    stride: int = 513
    windows_per_batch: int = 4
    # How overlapping windows, flips and scales are combined: "logits" averages raw logits;
    # "probabilities" averages softmax probabilities (UniMatch V2 sums them; the argmax is
    # the same) and returns their log, so a softmax of the result gives the mean.
    merge: str = "logits"
    # > 0: resize each view bilinearly to the nearest multiple of this (UniMatch V2 rounds
    # H/14 and W/14 to the nearest integer) before the network, and the logits back after.
    # 14 for a patch-14 ViT on whole images; 0 keeps the size.
    resize_to_multiple: int = 0
    # Also report every other head of the method (e.g. PCR's prototype head).
    all_heads: bool = False
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    # "nanmean": mean IoU over the classes present in the ground truth or the prediction;
    # "release": U2PL's mean over all classes of intersection / (union + 1e-10), where a
    # class absent from both counts as 0. They differ only when some class is absent.
    miou: str = "nanmean"


@dataclass
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The chosen method's own dataclass (a MethodConfig subclass).
    method: Any = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.epoch_over": ("unlabeled", "labeled"),
    "data.scale_sampling": ("uniform", "split"),
    "optim.name": ("sgd", "adamw"),
    "train.loss": ("ce", "ohem"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.on_nonfinite": ("stop", "skip"),
    "eval.mode": ("whole", "sliding"),
    "eval.miou": ("nanmean", "release"),
    "eval.merge": ("logits", "probabilities"),
}
# Nested blocks' choices, checked with their own section.
_VIT_CHOICES: dict[str, tuple[str, ...]] = {"position_resize": ("timm", "dinov2")}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and merge its ``base:`` parents beneath it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' reference")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    from protoseg.config.yaml_io import YAMLInputError, load_yaml

    try:
        text = load_yaml(path.read_text(), path) or {}
    except YAMLInputError as exc:
        # Duplicate keys and alias bombs included: the message names the line.
        raise ConfigError(str(exc)) from None
    if not isinstance(text, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = text.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        parent = _read_yaml(path.parent / base, seen + (path,))
        merged = OmegaConf.to_container(OmegaConf.merge(merged, parent))  # type: ignore[assignment]
    return OmegaConf.to_container(OmegaConf.merge(merged, text))  # type: ignore[return-value]


def _merge(schema: Any, *layers: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, *layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(
            f"{source}: invalid key or value {key!r}: {(exc.msg or str(exc)).splitlines()[0]}"
        ) from None


def _parse_overrides(overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
    # from_dotlist reads "key=" as None; an empty value means the empty string here.
    empty = [item[:-1] for item in overrides if item.endswith("=")]
    conf = OmegaConf.from_dotlist([item for item in overrides if not item.endswith("=")])
    for key in empty:
        OmegaConf.update(conf, key, "", force_add=True)
    return conf


def validate(cfg: Config) -> Config:
    """Check the values that types alone cannot; raise ConfigError naming the key."""
    flat = {
        f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
        for s in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, s.name))
    }
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r}: choose one of {', '.join(allowed)}")
    positive = [
        "data.num_classes",
        "data.crop_size",
        "train.batch_size",
        "train.epochs",
        "train.log_every",
        "optim.lr",
        "eval.window",
        "eval.stride",
    ]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be > 0")
    if cfg.train.iterations < 0:
        raise ConfigError(
            f"train.iterations={cfg.train.iterations} must be >= 0 (0 = use train.epochs)"
        )
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optim.betas={list(betas)} must be two values in [0, 1)")
    if cfg.optim.weight_decay < 0 or cfg.optim.decoder_lr_mult <= 0:
        raise ConfigError("optim.weight_decay must be >= 0 and optim.decoder_lr_mult > 0")
    if cfg.model.output_stride not in (8, 16, 32):
        raise ConfigError("model.output_stride must be 8, 16 or 32")
    if cfg.data.crop_size < 2 * cfg.model.output_stride:
        raise ConfigError(
            f"data.crop_size={cfg.data.crop_size} is too small for model.output_stride="
            f"{cfg.model.output_stride}: the deepest feature map would be under 2 x 2 pixels; "
            f"use a crop of at least {2 * cfg.model.output_stride}"
        )
    _validate_vit(cfg.model.vit)
    lo, hi = (cfg.data.scale_range + [0, 0])[:2]
    if len(cfg.data.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError("data.scale_range must be [min, max] with 0 < min <= max")
    if cfg.data.scale_sampling == "split" and not lo <= 1.0 <= hi:
        raise ConfigError(
            f"data.scale_sampling=split draws below and above 1, but data.scale_range="
            f"{cfg.data.scale_range} does not contain 1; widen it or use uniform"
        )
    if cfg.eval.resize_to_multiple < 0:
        raise ConfigError(
            f"eval.resize_to_multiple={cfg.eval.resize_to_multiple} must be >= 0 (0 = keep the "
            "size; 14 for a patch-14 ViT)"
        )
    if cfg.train.ohem_min_kept < 0:
        raise ConfigError(f"train.ohem_min_kept={cfg.train.ohem_min_kept} must be >= 0")
    if cfg.data.class_names and len(cfg.data.class_names) != cfg.data.num_classes:
        raise ConfigError(
            f"data.class_names has {len(cfg.data.class_names)} names but "
            f"data.num_classes is {cfg.data.num_classes}"
        )
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("data.mean and data.std need three values (RGB)")
    if cfg.train.max_device_batch < 0 or cfg.train.keep_last < 1:
        raise ConfigError("train.max_device_batch must be >= 0 and train.keep_last >= 1")
    if cfg.train.batch_size == 1 or cfg.train.max_device_batch == 1:
        raise ConfigError(
            "train.batch_size and train.max_device_batch must be >= 2: BatchNorm cannot "
            "normalise a batch of one image (ASPP's image-pooling branch is 1 x 1)"
        )
    if not isinstance(cfg.method, MethodConfig):
        raise ConfigError("the method section must be a registered method's config dataclass")
    from protoseg.config.ranges import check_ranges

    check_ranges(cfg)  # every number's range (finite, signs, [0, 1] probabilities...)
    try:
        cfg.method.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


# Arguments of timm.create_model that the vit_dpt encoder sets itself.
_VIT_OWN_ARGS = ("pretrained", "num_classes", "dynamic_img_size", "dynamic_img_pad")


def _validate_vit(vit: ViTConfig) -> None:
    """Check ``model.vit`` (the encoder's depth is checked when the network is built)."""
    for key, allowed in _VIT_CHOICES.items():
        if getattr(vit, key) not in allowed:
            raise ConfigError(
                f"model.vit.{key}={getattr(vit, key)!r}: choose one of {', '.join(allowed)}"
            )
    if vit.blocks and (
        len(vit.blocks) != 4
        or min(vit.blocks) < 0
        or any(a >= b for a, b in zip(vit.blocks, vit.blocks[1:]))
    ):
        raise ConfigError(
            f"model.vit.blocks={vit.blocks}: the DPT takes four encoder blocks, 0-based and "
            "increasing, e.g. [2, 5, 8, 11]; or [] for UniMatch V2's choice by depth"
        )
    if vit.features < 0:
        raise ConfigError(f"model.vit.features={vit.features} must be >= 0 (0 = by encoder width)")
    if vit.out_channels and (len(vit.out_channels) != 4 or min(vit.out_channels) < 1):
        raise ConfigError(
            f"model.vit.out_channels={vit.out_channels}: give four positive widths, one per "
            "DPT level, or [] for UniMatch V2's by encoder width"
        )
    taken = sorted(set(vit.encoder_args) & set(_VIT_OWN_ARGS))
    if taken:
        raise ConfigError(
            f"model.vit.encoder_args sets {', '.join(taken)}, which vit_dpt sets itself; "
            "remove them (weights come from model.pretrained)"
        )


def shipped_config_dir() -> Path:
    """The folder of the YAML recipes that ship with protoseg (``configs/`` of the source tree)."""
    from importlib.resources import files

    try:
        return Path(str(files("protoseg.configs")))
    except ModuleNotFoundError:
        # A source checkout on PYTHONPATH, not installed: configs/ sits beside the package.
        return Path(__file__).resolve().parents[2] / "configs"


def find_config(name: str | Path) -> Path:
    """A config given as a path, or as a name relative to the shipped configs folder."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_config_dir() / name
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config {name} not found: not a file, nor one of the shipped configs "
        f"in {shipped_config_dir()} (e.g. voc/classic/92/pcr.yaml)"
    )


def _method_schema(name: str) -> Any:
    return OmegaConf.structured(Config(method=method_config_class(name)()))


def _method_name(*layers: Any) -> str:
    """The ``method.name`` the last layer that sets one gives (default: supervised)."""
    name = MethodConfig.name
    for layer in layers:
        method = layer.get("method") if hasattr(layer, "get") else None
        if method is not None and hasattr(method, "get") and method.get("name") is not None:
            name = str(method.get("name"))
    return name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with its ``base:`` parents) and dotted overrides into a Config.

    ``path`` may also name a shipped recipe, e.g. ``voc/classic/92/pcr.yaml``. The
    ``method:`` section is checked against the dataclass of the method it names.
    """
    layers: list[Any] = []
    source = "defaults"
    if path is not None:
        path = find_config(path)
        source = str(path)
        layers.append(_read_yaml(path))
    parsed = _parse_overrides(overrides) if overrides else None
    schema = _method_schema(_method_name(*layers, *([parsed] if parsed is not None else [])))
    merged = _merge(schema, *layers, source=source)
    if parsed is not None:
        merged = _merge(merged, parsed, source="command-line override")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(
            f"{source}: missing value for {key!r}: set it in the YAML or as {key}=..."
        ) from None
    if not cfg.train.out_dir:
        cfg.train.out_dir = default_run_dir(path)
    return validate(cfg)


def default_run_dir(config: str | Path | None) -> str:
    """``runs/<config path without .yaml>``: shipped recipes by their name (synthetic/pcr),
    other files by their path, so two recipes never share a run folder by default."""
    if config is None:
        return "runs/default"
    path = Path(config)
    shipped = shipped_config_dir().resolve()
    resolved = path.resolve()
    if shipped in resolved.parents:
        rel = resolved.relative_to(shipped)
    elif path.is_absolute():
        rel = Path(path.name)
    else:
        rel = Path(*[part for part in path.parts if part not in ("..", ".")])
    return str(Path("runs") / rel.with_suffix(""))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python containers (for checkpoints and YAML)."""
    return dataclasses.asdict(cfg)


def from_dict(
    data: dict[str, Any], with_method: bool = True, overrides: list[str] | None = None
) -> Config:
    """Rebuild a Config from ``to_dict`` output (as stored in a checkpoint or model file).

    ``with_method=False`` keeps only the method's name (inference needs no training
    hyper-parameters, and a model file of an older version may carry other method keys).
    """
    data = dict(data)
    name = str((data.get("method") or {}).get("name", MethodConfig.name))
    if with_method:
        schema = _method_schema(name)
    else:
        data["method"] = {"name": name}
        schema = OmegaConf.structured(Config(method=MethodConfig()))
    merged = _merge(schema, data, source="checkpoint config")
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), source="command-line override")
    return validate(OmegaConf.to_object(merged))  # type: ignore[arg-type]


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# What makes a checkpoint a different experiment. Everything else (paths, device, workers,
# logging, checkpoint and evaluation cadence, the per-device batch) may change on resume;
# model.pretrained only matters at initialisation, which a resume replaces.
RECIPE_KEYS: tuple[str, ...] = (
    "model.",
    "method.",
    "optim.",
    "data.num_classes",
    "data.ignore_index",
    "data.labeled_split",
    "data.unlabeled_split",
    "data.mean",
    "data.std",
    "data.crop_size",
    "data.scale_range",
    "data.scale_sampling",
    "data.hflip",
    "data.epoch_over",
    "train.epochs",
    "train.iterations",
    "train.batch_size",
    "train.loss",
    "train.ohem_threshold",
    "train.ohem_min_kept",
    "train.aux_weight",
    "train.seed",
    "train.precision",
)
# Memory and speed switches that leave the network's function unchanged are free too.
_RESUME_FREE_KEYS: tuple[str, ...] = (
    "model.pretrained",
    "model.vit.checkpointing",
    "model.vit.fused_attention",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each recipe key that differs between two ``to_dict`` configs."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(old.keys() & new.keys()):
        is_recipe = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RECIPE_KEYS)
        if is_recipe and key not in _RESUME_FREE_KEYS and old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes
