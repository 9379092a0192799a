"""Qualitative grids: image / ground truth / each model's prediction (the paper's Figs. 4-5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from protoseg.analysis.predict import Predictor
from protoseg.data import colorize


def prediction_grid(
    predictors: dict[str, Predictor],
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | None],
    palette: Sequence[tuple[int, int, int]],
    path: str | Path,
    ignore_index: int = 255,
) -> Path:
    """Save a PNG grid, one row per image: input, ground truth, then one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["image", "ground truth", *predictors]
    rows = len(images)
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows),
                             squeeze=False)
    for r, (image, mask) in enumerate(zip(images, masks)):
        panels = [np.asarray(image.convert("RGB"))]
        if mask is None:
            panels.append(np.zeros_like(panels[0]))
        else:
            panels.append(colorize(np.where(mask == ignore_index, 255, mask), palette))
        for predictor in predictors.values():
            panels.append(colorize(predictor.predict(image), palette))
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
