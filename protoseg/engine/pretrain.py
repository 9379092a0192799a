"""``protoseg pretrain``: an encoder pretrained on the synthetic classification set, cached.

The synthetic benchmark's stand-in for ImageNet pretraining (see
:mod:`protoseg.data.synthetic_pretrain`). A timm classifier of the backbone is trained with
cross-entropy over the set's shapes and saved whole as safetensors, which
``model.pretrained=FILE`` loads (the features-only trunk drops the classifier) and
``timm.create_model(name, num_classes=10, pretrained=True, pretrained_cfg_overlay={"file":
FILE, "num_classes": 10})`` reads too. The file's metadata holds its settings and the set's
version; a later call with the same ones reuses the file instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from timm.models import is_model_in_modules, split_model_name_tag
from torch import Tensor, nn

from protoseg.config import IMAGENET_MEAN, IMAGENET_STD
from protoseg.data.synthetic_pretrain import (
    PRETRAIN_LABELS,
    PRETRAIN_SET_VERSION,
    render_pretrain_set,
)
from protoseg.distributed import resolve_device
from protoseg.files import atomic_write
from protoseg.progress import show_progress

log = logging.getLogger(__name__)

METADATA_KEY = "protoseg_pretrain"


@dataclass(frozen=True)
class PretrainSettings:
    """What decides the pretrained weights: the backbone, the set drawn and the schedule."""

    backbone: str = "resnet10t"
    num_images: int = 12800
    num_val: int = 512
    # 32 px with one large object: four times the images of 64 px for the same compute, which
    # is what lets the trunk learn shapes in three minutes of a 2-core CPU.
    image_size: int = 32
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.003
    weight_decay: float = 0.05
    seed: int = 0
    # CPU threads of the training: torch's CPU kernels split their reductions per thread, so
    # the weights (and every result trained from them) depend on the count, not on the cores.
    # Fixed, the same settings give the same file on any machine (with the same CPU kernels).
    threads: int = 2
    # More timm.create_model arguments of the backbone, e.g. a ViT shrunk to the benchmark
    # (patch_size, embed_dim, depth, num_heads, img_size). Training must build its encoder
    # with the same ones (model.vit.encoder_args) for the weights to fit.
    model_args: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings no run could use."""
        own = sorted(set(self.model_args) & {"num_classes", "pretrained", "dynamic_img_size"})
        if own:
            raise ValueError(
                f"model_args may not set {', '.join(own)}: the pretraining sets them itself"
            )
        if min(self.num_images, self.num_val, self.epochs, self.batch_size, self.threads) < 1:
            raise ValueError("num_images, num_val, epochs, batch_size and threads must all be >= 1")
        if self.image_size < 16:
            raise ValueError(f"image_size={self.image_size} must be >= 16")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")

    def stamp(self) -> dict:
        """The settings and the set's version: what a cached file must match to be reused."""
        stamp = {"set_version": PRETRAIN_SET_VERSION, **asdict(self)}
        if not self.model_args:
            # Settings without model arguments keep the stamp, and so the file name and the
            # cache, they had before the field existed.
            del stamp["model_args"]
        return stamp

    def file_name(self) -> str:
        """``<backbone>-synthetic-<hash of the stamp>.safetensors``."""
        digest = hashlib.sha256(json.dumps(self.stamp(), sort_keys=True).encode()).hexdigest()
        return f"{self.backbone}-synthetic-{digest[:10]}.safetensors"


@dataclass(frozen=True)
class PretrainResult:
    """Where the weights are, their held-out top-1 accuracy (%), and the time taken."""

    file: Path
    val_accuracy: float
    seconds: float
    reused: bool


def cached_stamp(path: Path) -> dict | None:
    """The stamp in a weights file's metadata, or None if the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return json.loads(meta[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def create_classifier(settings: PretrainSettings) -> nn.Module:
    """The timm classifier of ``settings.backbone`` with ``settings.model_args``, random init.

    A plain ViT (timm's vision_transformer / eva) is built with ``dynamic_img_size=True``:
    its position embeddings stay on the grid of its ``img_size`` (the segmentation crop's,
    which the segmentation encoder loads them at) and are resampled to the pretraining
    images' smaller grid on each forward.
    """
    kwargs: dict[str, Any] = dict(settings.model_args)
    if is_model_in_modules(
        split_model_name_tag(settings.backbone)[0], ("vision_transformer", "eva")
    ):
        kwargs["dynamic_img_size"] = True
    return timm.create_model(settings.backbone, num_classes=len(PRETRAIN_LABELS), **kwargs)


def _augment(images: Tensor, generator: torch.Generator, pad: int = 6) -> Tensor:
    """Random flips (both axes: the shapes have no upright) and random shifted crops."""
    n, _, h, w = images.shape
    flips = torch.rand(n, 2, generator=generator) < 0.5
    images = torch.where(flips[:, 0, None, None, None], images.flip(-1), images)
    images = torch.where(flips[:, 1, None, None, None], images.flip(-2), images)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def _to_input(images: np.ndarray, device: torch.device) -> Tensor:
    """uint8 (N, H, W, 3) to normalised float (N, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


@torch.no_grad()
def _val_accuracy(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> float:
    """Top-1 accuracy (%) on the held-out images."""
    model.eval()
    predicted = torch.cat(
        [
            model(_to_input(images[i : i + 256], device)).argmax(1).cpu()
            for i in range(0, len(images), 256)
        ]
    ).numpy()
    model.train()
    return 100.0 * float((predicted == labels).mean())


def pretrain_backbone(
    settings: PretrainSettings, out_file: Path, device: str = "auto", progress: bool = True
) -> PretrainResult:
    """Train the backbone's classifier on the pretraining set and save it to ``out_file``."""
    settings.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _pretrain(settings, out_file, resolve_device(device), progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    settings: PretrainSettings, out_file: Path, dev: torch.device, progress: bool
) -> PretrainResult:
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    workers = max(1, min(8, os.cpu_count() or 1))
    log.info(
        "pretrain: drawing %d + %d images (%d px)",
        settings.num_images,
        settings.num_val,
        settings.image_size,
    )
    images, labels = render_pretrain_set(
        settings.num_images, settings.image_size, settings.seed, workers
    )
    val_images, val_labels = render_pretrain_set(
        settings.num_val, settings.image_size, settings.seed, workers, first=settings.num_images
    )
    model = create_classifier(settings).to(dev)
    # foreach: the per-parameter loop's values bit for bit, with less Python per parameter.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, foreach=True
    )
    steps_per_epoch = settings.num_images // settings.batch_size
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(settings.seed)
    order_rng = np.random.default_rng(settings.seed)
    bar = None
    if show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"pretrain {settings.backbone}", dynamic_ncols=True)
    val_accuracy = float("nan")
    for epoch in range(settings.epochs):
        order = order_rng.permutation(settings.num_images)
        running = 0.0
        for i in range(steps_per_epoch):
            index = np.sort(order[i * settings.batch_size : (i + 1) * settings.batch_size])
            x = _to_input(images[index], torch.device("cpu"))
            x = _augment(x, generator, pad=settings.image_size // 10).to(dev)
            y = torch.from_numpy(labels[index]).to(dev)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            if bar is not None:
                bar.update(1)
        val_accuracy = _val_accuracy(model, val_images, val_labels, dev)
        log.info(
            "pretrain epoch %d/%d: loss %.4f, held-out accuracy %.2f",
            epoch + 1,
            settings.epochs,
            running / steps_per_epoch,
            val_accuracy,
        )
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    stamp = settings.stamp()
    metadata = {
        METADATA_KEY: json.dumps(stamp, sort_keys=True),
        "val_accuracy": f"{val_accuracy:.4f}",
        "labels": json.dumps(list(PRETRAIN_LABELS)),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = safetensors_bytes(state, metadata)
    atomic_write(out_file, lambda handle: handle.write(payload))
    log.info("pretrain: wrote %s (held-out accuracy %.2f, %.0f s)", out_file, val_accuracy, seconds)
    return PretrainResult(out_file, val_accuracy, seconds, reused=False)


def ensure_pretrained(
    cache_dir: str | Path,
    settings: PretrainSettings | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> PretrainResult:
    """The cached weights of ``settings`` under ``cache_dir``; trained first if not there."""
    settings = settings or PretrainSettings()
    path = Path(cache_dir) / settings.file_name()
    if not force and cached_stamp(path) == settings.stamp():
        with safe_open(str(path), framework="pt") as handle:
            val_accuracy = float((handle.metadata() or {}).get("val_accuracy", "nan"))
        log.info("pretrain: reusing %s", path)
        return PretrainResult(path, val_accuracy, 0.0, reused=True)
    return pretrain_backbone(settings, path, device, progress)
