"""Loading a trained model for inference: ``protoseg.load(model_file)`` returns a Predictor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

# The parts register the builders of the heads they deploy (e.g. the prototype head).
import protoseg.components  # noqa: F401
from protoseg.config import Config, EvalConfig
from protoseg.data import to_rgb
from protoseg.files import CheckpointError, load_state_strict
from protoseg.inference.core import infer_logits
from protoseg.inference.model_file import read_model_file
from protoseg.models import HEADS, create_model

# Head kind (as a model file's ``heads`` entry names it) -> builder around the network.
HEAD_BUILDERS = HEADS


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
    model_file = read_model_file(checkpoint)
    cfg = model_file.config
    network = create_model(cfg.model, cfg.data.num_classes)
    load_state_strict(network, model_file.state_dict, checkpoint)
    model: nn.Module = network
    if head != "linear":
        spec = model_file.heads.get(head)
        if spec is None:
            heads = ", ".join(["linear", *model_file.heads])
            raise CheckpointError(f"{checkpoint}: has no {head!r} head; its heads: {heads}")
        if spec.get("kind") not in HEAD_BUILDERS:
            raise CheckpointError(
                f"{checkpoint}: head {head!r} is of an unknown kind {spec.get('kind')!r}; "
                "was it written by a newer protoseg?"
            )
        try:
            model = HEAD_BUILDERS[spec["kind"]](network, spec)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{checkpoint}: head {head!r} cannot be rebuilt: {exc}") from None
    model.to(device).eval()
    return Predictor(model, cfg, model_file.class_names, model_file.palette, device)
