"""Qualitative grids: image / ground truth / each model's prediction (the paper's Figs. 4-5)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from protoseg.analysis.discrimination import checkpoint_names
from protoseg.analysis.legend import legend_entries
from protoseg.config import Config, EvalConfig
from protoseg.data import build_dataset, colorize, eval_transform
from protoseg.files import atomic_write
from protoseg.inference import Predictor, load

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_figure(
    predictors: dict[str, Predictor],
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | None],
    palette: Sequence[tuple[int, int, int]],
    ignore_index: int = 255,
    eval_cfg: EvalConfig | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """The grid of ``prediction_grid`` as a matplotlib figure, with one class-colour legend
    below it listing the classes present in its ground truths and predictions.

    ``class_names`` defaults to the first predictor's.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    if class_names is None:
        class_names = next(iter(predictors.values())).class_names if predictors else []
    columns = ["image", "ground truth", *predictors]
    rows = len(images)
    fig, axes = plt.subplots(
        rows,
        len(columns),
        figsize=(2.2 * len(columns), 2.2 * rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    shown: list[np.ndarray] = []
    for r, (image, mask) in enumerate(zip(images, masks)):
        panels = [np.asarray(image.convert("RGB"))]
        if mask is None:
            panels.append(np.zeros_like(panels[0]))
        else:
            # Ignored pixels are drawn in the colour of id 255 whatever the ignore index.
            truth = np.where(mask == ignore_index, 255, mask)
            shown.append(truth)
            panels.append(colorize(truth, palette))
        for predictor in predictors.values():
            prediction = predictor.predict(image, eval_cfg)
            shown.append(prediction)
            panels.append(colorize(prediction, palette))
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    entries = legend_entries(shown, class_names, palette, ignore_index=255)
    if entries:
        handles = [
            Patch(facecolor="#{:02x}{:02x}{:02x}".format(*e.color), edgecolor="0.35", label=e.label)
            for e in entries
        ]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), max(3, len(columns) * 2)),
            fontsize=8,
            frameon=False,
        )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def prediction_grid(
    predictors: dict[str, Predictor],
    images: Sequence[Image.Image],
    masks: Sequence[np.ndarray | None],
    palette: Sequence[tuple[int, int, int]],
    path: str | Path,
    ignore_index: int = 255,
    eval_cfg: EvalConfig | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG grid, one row per image: input, ground truth, then one column per model,
    with a legend of the classes shown (see ``grid_figure``)."""
    fig = grid_figure(
        predictors, images, masks, palette, ignore_index, eval_cfg, class_names, title
    )
    path = Path(path)
    # Through a temporary file: a full disk leaves no truncated PNG and names the file.
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    pyplot().close(fig)
    return path


def load_val_examples(
    cfg: Config, names: Sequence[str] | None = None, count: int = 4, seed: int | None = 0
) -> tuple[list[str], list[Image.Image], list[np.ndarray]]:
    """Named validation images and masks, via the layout reader; without names, ``count``
    drawn with ``seed``, or the split's first ``count`` when ``seed`` is None."""
    dataset = build_dataset(cfg.data, "val", eval_transform(cfg.data))
    listed = [sample.name for sample in dataset.samples]
    if names:
        where = {name: i for i, name in enumerate(listed)}
        unknown = [n for n in names if n not in where]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} not in the validation split "
                f"{cfg.data.val_split} (names look like {listed[0]!r})"
            )
        indices = [where[n] for n in names]
    else:
        if count < 1:
            raise ValueError(f"--count must be >= 1, got {count}")
        size = min(count, len(listed))
        if seed is None:
            indices = list(range(size))
        else:
            rng = np.random.default_rng(seed)
            indices = sorted(rng.choice(len(listed), size=size, replace=False))
    images = [dataset.load_image(int(i)) for i in indices]
    masks = [dataset.load_mask(int(i), image.size) for i, image in zip(indices, images)]
    return [listed[int(i)] for i in indices], images, masks  # type: ignore[return-value]


def qualitative_figure(
    checkpoints: Sequence[str | Path],
    cfg: Config,
    path: str | Path,
    names: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    count: int = 4,
    seed: int = 0,
    device: str = "auto",
    head: str = "linear",
) -> Path:
    """Figures 4-5: image / ground truth / each checkpoint's prediction on validation images."""
    titles = checkpoint_names(checkpoints, names)
    predictors = {t: load(c, device=device, head=head) for t, c in zip(titles, checkpoints)}
    _, pictures, masks = load_val_examples(cfg, images, count, seed)
    palette = next(iter(predictors.values())).palette
    return prediction_grid(
        predictors, pictures, masks, palette, path, cfg.data.ignore_index, cfg.eval
    )
