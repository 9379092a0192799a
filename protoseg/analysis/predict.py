"""Loading a trained model for inference: ``protoseg.load(checkpoint)`` returns a Predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from protoseg.config import Config, EvalConfig, from_dict
from protoseg.engine.checkpoint import (
    MODEL_FORMAT,
    CheckpointError,
    load_file,
    load_state_strict,
)
from protoseg.engine.evaluator import infer_logits
from protoseg.models import create_model
from protoseg.prototypes import PrototypeBank, PrototypeSegmenter

_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit/float greyscale rescaled, alpha dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        # PIL's own conversion clips 16-bit values at 255, turning most pixels white.
        grey = np.asarray(image, dtype=np.float64)
        peak = 255.0 if grey.max(initial=0.0) <= 255.0 else 65535.0
        grey = np.clip(grey / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids PIL's warning about byte-coded palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _split_training_state(state: dict[str, Any]) -> tuple[dict, dict | None]:
    """The deployed network's weights (the teacher when there is one) and the bank."""

    def sub(prefix: str) -> dict[str, Any]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    network = sub("teacher.") or sub("model.")
    bank = sub("bank.") or None
    return network, bank


@dataclass
class Predictor:
    """A trained network plus what it needs to read images and colour its output."""

    model: nn.Module
    config: Config
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    device: torch.device

    @property
    def mean(self) -> list[float]:
        """Normalisation mean (RGB, 0-1)."""
        return list(self.config.data.mean)

    @property
    def std(self) -> list[float]:
        """Normalisation std (RGB, 0-1)."""
        return list(self.config.data.std)

    def preprocess(self, image: Image.Image | np.ndarray) -> Tensor:
        """A PIL image of any mode or an HxW(x3) uint8 array -> normalised (1, 3, H, W) tensor."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return ((tensor - mean) / std)[None]

    @torch.no_grad()
    def logits(self, images: Tensor, eval_cfg: EvalConfig | None = None) -> Tensor:
        """(B, C, H, W) logits for a normalised batch, with the config's inference protocol."""
        cfg = eval_cfg or self.config.eval
        self.model.eval()
        return infer_logits(self.model, images.to(self.device), cfg, self.config.data.num_classes)

    @torch.no_grad()
    def predict(
        self, image: Image.Image | np.ndarray, eval_cfg: EvalConfig | None = None
    ) -> np.ndarray:
        """Class-id mask (H, W) uint8 of one image at its own size."""
        return self.predict_batch([image], eval_cfg)[0]

    @torch.no_grad()
    def predict_batch(
        self, images: list[Image.Image | np.ndarray], eval_cfg: EvalConfig | None = None
    ) -> list[np.ndarray]:
        """Class-id masks (H, W) uint8 of several images that share one size."""
        if not images:
            return []
        tensors = [self.preprocess(image) for image in images]
        sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
        if len(sizes) > 1:
            raise ValueError(
                f"predict_batch needs images of one size, got (H, W) sizes {sizes}; "
                "call predict() per image instead"
            )
        batch = torch.cat(tensors)
        labels = self.logits(batch, eval_cfg).argmax(dim=1)
        # uint8 holds at most 256 ids; wider label sets keep int64 rather than wrap around.
        dtype = torch.uint8 if self.config.data.num_classes <= 256 else torch.int64
        return list(labels.to(dtype).cpu().numpy())


def load(
    checkpoint: str | Path, device: str | torch.device = "cpu", head: str = "linear"
) -> Predictor:
    """Load a model file (model.pt / best.pt) or a training checkpoint for inference."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    data = load_file(checkpoint, map_location="cpu")
    cfg = from_dict(data["config"])
    network = create_model(cfg.model, cfg.data.num_classes)
    if data["format"] == MODEL_FORMAT:
        weights, bank_state = data["state_dict"], data.get("prototypes")
    else:
        weights, bank_state = _split_training_state(data["method"])
    load_state_strict(network, weights, checkpoint)
    model: nn.Module = network
    if head == "prototype":
        if not bank_state:
            raise CheckpointError(
                f"{checkpoint}: has no prototype bank; use --head linear "
                "(only PCR checkpoints have one)"
            )
        m = cfg.method
        bank = PrototypeBank(
            cfg.data.num_classes,
            m.prototypes_per_class,
            network.feature_dim,
            m.prototype_momentum,
            m.temperature,
            cfg.data.ignore_index,
        )
        load_state_strict(bank, bank_state, checkpoint, "prototype bank")
        model = PrototypeSegmenter(network, bank)
    elif head != "linear":
        raise ValueError(f"unknown head {head!r}: use linear or prototype")
    model.to(device).eval()
    names = (
        data.get("class_names")
        or list(cfg.data.class_names)
        or [f"class_{i}" for i in range(cfg.data.num_classes)]
    )
    palette = [tuple(c) for c in data.get("palette") or []]
    if not palette:
        from protoseg.data import voc_palette

        palette = voc_palette(256)
    return Predictor(model, cfg, list(names), palette, device)  # type: ignore[arg-type]
