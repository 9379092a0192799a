"""t-SNE maps of sampled pixel features, one panel per checkpoint (the paper's Figure 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from protoseg.analysis.discrimination import (
    checkpoint_names,
    sample_features,
    select_pixels,
    val_dataset,
)
from protoseg.config import Config
from protoseg.files import atomic_write
from protoseg.inference import load

# scikit-learn's default; smaller samples get a smaller one (it must stay below N).
DEFAULT_PERPLEXITY = 30.0
# PCA before t-SNE: the usual speed-up, and it removes most of the noise dimensions.
PCA_DIMS = 50


def embed(
    features: Tensor | np.ndarray, perplexity: float | None = None, seed: int = 0
) -> np.ndarray:
    """(N, D) features -> (N, 2) t-SNE coordinates (PCA to 50 dims first)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}; raise --pixels-per-class")
    if perplexity is None:
        perplexity = min(DEFAULT_PERPLEXITY, (n - 1) / 3.0)
    if not 0 < perplexity < n:
        raise ValueError(f"perplexity {perplexity} must lie in (0, {n}) for {n} points")
    dims = min(PCA_DIMS, n, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto"
    )
    return tsne.fit_transform(x)


def plot_embeddings(
    panels: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    path: str | Path,
) -> Path:
    """Scatter plots of {panel name: ((N, 2) points, (N,) labels)} sharing one class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.6, 4.2), squeeze=False)
    present = sorted({int(c) for _, labels in panels.values() for c in np.unique(labels)})
    handles = {}
    for ax, (title, (points, labels)) in zip(axes[0], panels.items()):
        for c in present:
            chosen = labels == c
            color = np.asarray(palette[c] if c < len(palette) else (0, 0, 0)) / 255.0
            name = class_names[c] if c < len(class_names) else f"class_{c}"
            handles[c] = ax.scatter(
                points[chosen, 0],
                points[chosen, 1],
                s=4,
                color=color,
                label=f"{c}: {name}",
                edgecolors="none",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(
        [handles[c] for c in present],
        [handles[c].get_label() for c in present],
        loc="center right",
        fontsize=8,
        markerscale=3,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    path = Path(path)
    # Through a temporary file: a full disk leaves no truncated PNG and names the file.
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path


def tsne_figure(
    checkpoints: Sequence[str | Path],
    cfg: Config,
    path: str | Path,
    names: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    pixels_per_class: int = 300,
    perplexity: float | None = None,
    seed: int = 0,
    device: str = "auto",
    max_images: int | None = None,
    progress: bool = True,
) -> Path:
    """Figure 2: t-SNE of the same sampled validation pixels for each checkpoint."""
    titles = checkpoint_names(checkpoints, names)
    dataset = val_dataset(cfg)
    selection = select_pixels(dataset, pixels_per_class, classes, seed, max_images, progress)
    panels = {}
    class_names, palette = list(cfg.data.class_names), None
    for title, checkpoint in zip(titles, checkpoints):
        predictor = load(checkpoint, device=device, head="linear")
        features, labels = sample_features(predictor, dataset, selection, progress=progress)
        panels[title] = (embed(features.numpy(), perplexity, seed), labels.numpy())
        class_names = class_names or predictor.class_names
        palette = palette or predictor.palette
    return plot_embeddings(panels, class_names, palette or [], path)
