"""Typed configuration: dataclasses loaded from YAML, validated at load, overridable by dotted keys.

A YAML file may name parent files under ``base:`` (a path or a list of paths, relative to
the file); parents are merged first, in order, then the file itself, then CLI overrides.
Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
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
class ModelConfig:
    """The segmentation network."""

    name: str = "deeplabv3plus"
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


# method name -> its config dataclass; filled by protoseg.methods.register_method.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the registered method ``name`` (ConfigError if unknown)."""
    if name not in METHOD_CONFIGS:
        # Registration happens when the method modules are imported.
        import protoseg.methods  # noqa: F401
    if name not in METHOD_CONFIGS:
        close = difflib.get_close_matches(name, METHOD_CONFIGS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"method.name={name!r} is not a registered method.{hint} "
            f"Choose one of {', '.join(sorted(METHOD_CONFIGS))}"
        )
    return METHOD_CONFIGS[name]


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
    # lock_backbone). The method freezes it when it builds the student (before DDP).
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
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and merge its ``base:`` parents beneath it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' reference")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
    lo, hi = (cfg.data.scale_range + [0, 0])[:2]
    if len(cfg.data.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError("data.scale_range must be [min, max] with 0 < min <= max")
    if cfg.data.scale_sampling == "split" and not lo <= 1.0 <= hi:
        raise ConfigError(
            f"data.scale_sampling=split draws below and above 1, but data.scale_range="
            f"{cfg.data.scale_range} does not contain 1; widen it or use uniform"
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
    try:
        cfg.method.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def shipped_config_dir() -> Path:
    """The folder of the YAML recipes that ship with protoseg (``configs/`` of the source tree)."""
    from importlib.resources import files

    try:
        return Path(str(files("protoseg.configs")))
    except ModuleNotFoundError:
        # A source checkout on PYTHONPATH, not installed: configs/ sits beside the package.
        return Path(__file__).resolve().parents[1] / "configs"


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


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(config_yaml(cfg))


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
_RESUME_FREE_KEYS: tuple[str, ...] = ("model.pretrained",)


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
