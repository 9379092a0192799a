"""Intra-/inter-class discrimination of decoder features (the paper's Table 5, LDA traces).

Pixels are drawn per class, uniformly without replacement among the labelled pixels of the
validation split (ignore pixels never), and the draw depends only on the labels and the
seed, so every checkpoint is measured on the very same pixels. A pixel's feature is the
512-d stride-4 decoder map bilinearly interpolated at that pixel with the release's
``align_corners=True`` convention, i.e. what upsampling the map to the input size would
give there, without materialising the full-size map.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from protoseg.config import Config
from protoseg.data import SegmentationDataset, build_dataset, eval_transform
from protoseg.files import atomic_write_text
from protoseg.inference import Predictor, load
from protoseg.progress import show_progress


def scatter_traces(features: Tensor, labels: Tensor) -> dict[str, float]:
    """LDA scatter traces of (N, D) features with (N,) class labels: inter, intra and ratio.

    With N samples, n_c of class c, class means mu_c and overall mean
    mu = sum_c (n_c / N) mu_c:

    - inter = tr(S_b), S_b = sum_c (n_c / N) (mu_c - mu)(mu_c - mu)^T,
      so tr(S_b) = sum_c (n_c / N) ||mu_c - mu||^2;
    - intra = tr(S_w), S_w = sum_c (n_c / N) Cov_c with the population (1 / n_c)
      covariance, so tr(S_w) = (1 / N) sum_i ||x_i - mu_{y_i}||^2;
    - ratio = inter / intra (larger = more discriminative).

    inter + intra is the trace of the total (population) covariance. Computed in float64
    from norms only, never forming a D x D matrix.
    """
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected features (N, D) and labels (N,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("no samples: every class is empty")
    x = features.detach().to(torch.float64).cpu()
    y = labels.detach().to(torch.int64).cpu()
    classes, index, counts = torch.unique(y, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, index, x)
    means = sums / counts[:, None]
    weights = counts.to(torch.float64) / x.shape[0]
    overall = (weights[:, None] * means).sum(0)
    inter = float((weights * ((means - overall) ** 2).sum(1)).sum())
    intra = float(((x - means[index]) ** 2).sum() / x.shape[0])
    ratio = inter / intra if intra > 0 else math.inf
    return {"inter": inter, "intra": intra, "ratio": ratio}


@dataclass
class PixelSelection:
    """Chosen pixels: per image index, the (y, x) positions and their labels."""

    positions: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
    counts: dict[int, int]

    @property
    def total(self) -> int:
        """Number of pixels chosen over all classes."""
        return sum(self.counts.values())


def _keep_smallest(keys: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k entries with the smallest keys (all of them when there are at most k)."""
    if len(keys) <= k:
        return keys, rows
    keep = np.argpartition(keys, k - 1)[:k]
    return keys[keep], rows[keep]


def select_pixels(
    dataset: SegmentationDataset,
    pixels_per_class: int,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    max_images: int | None = None,
    progress: bool = False,
) -> PixelSelection:
    """Draw up to ``pixels_per_class`` labelled pixels per class, uniformly over the split."""
    if pixels_per_class < 1:
        raise ValueError(f"pixels per class must be >= 1, got {pixels_per_class}")
    wanted = list(range(dataset.num_classes)) if classes is None else list(classes)
    bad = [c for c in wanted if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} are outside [0, {dataset.num_classes}); "
            "pick ids from the config's data.class_names"
        )
    rng = np.random.default_rng(seed)
    # Every labelled pixel gets a uniform random key; the k smallest keys of a class are a
    # uniform sample without replacement, kept in O(k) memory across images.
    # Rows are (image index, y, x).
    best = {c: (np.empty(0), np.empty((0, 3), dtype=np.int64)) for c in wanted}
    n_images = len(dataset) if max_images is None else min(len(dataset), max_images)
    for index in tqdm(
        range(n_images), desc="select pixels", disable=not show_progress(progress), leave=False
    ):
        mask = dataset.load_mask(index)
        if mask is None:
            raise ValueError(
                f"{dataset.samples[index].image}: has no mask; discrimination "
                "needs a labelled split (data.val_split)"
            )
        flat = mask.reshape(-1)
        keys_all = rng.random(flat.shape[0])
        for c in wanted:
            where = np.flatnonzero(flat == c)
            if where.size == 0:
                continue
            keys, picked = _keep_smallest(keys_all[where], where, pixels_per_class)
            rows = np.stack([np.full_like(picked, index), *np.divmod(picked, mask.shape[1])], 1)
            old_keys, old_rows = best[c]
            best[c] = _keep_smallest(
                np.concatenate([old_keys, keys]), np.concatenate([old_rows, rows]), pixels_per_class
            )
    rows = np.concatenate([r for _, r in best.values()])
    labels = np.concatenate([np.full(len(r), c, dtype=np.int64) for c, (_, r) in best.items()])
    positions = {
        int(i): (rows[rows[:, 0] == i, 1], rows[rows[:, 0] == i, 2], labels[rows[:, 0] == i])
        for i in np.unique(rows[:, 0])
    }
    return PixelSelection(positions, {c: len(r) for c, (_, r) in best.items()})


def _sample_map(features: Tensor, ys: Tensor, xs: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear values of a (1, D, h, w) map at full-resolution pixels (align_corners=True)."""
    height, width = size
    # align_corners=True maps output pixel i to input coordinate i * (h - 1) / (H - 1); in
    # grid_sample's [-1, 1] space with align_corners=True that is 2 * i / (H - 1) - 1.
    gy = 2.0 * ys.double() / max(height - 1, 1) - 1.0
    gx = 2.0 * xs.double() / max(width - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(features.dtype)[None, None]
    sampled = F.grid_sample(features, grid.to(features.device), mode="bilinear", align_corners=True)
    return sampled[0, :, 0].T


@torch.no_grad()
def sample_features(
    predictor: Predictor,
    dataset: SegmentationDataset,
    selection: PixelSelection,
    normalize: bool = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(N, D) decoder features and (N,) labels at the selected pixels, for one network."""
    model = predictor.model
    model.eval()
    feats, labels = [], []
    items = tqdm(
        selection.positions.items(),
        desc="features",
        disable=not show_progress(progress),
        leave=False,
    )
    for index, (ys, xs, lab) in items:
        image = dataset[index]["image"][None].to(predictor.device)
        out = model(image)
        if not isinstance(out, dict) or "features" not in out:
            raise ValueError(
                "the model returns no 'features'; load the checkpoint with head "
                "linear or prototype from protoseg.inference.load"
            )
        vectors = _sample_map(
            out["features"].float(),
            torch.from_numpy(ys),
            torch.from_numpy(xs),
            tuple(image.shape[-2:]),
        ).cpu()
        feats.append(vectors)
        labels.append(torch.from_numpy(lab))
    if not feats:
        raise ValueError("no labelled pixels of the chosen classes in the validation split")
    features = torch.cat(feats).double()
    if normalize:
        features = F.normalize(features, dim=1)
    return features, torch.cat(labels)


def val_dataset(cfg: Config) -> SegmentationDataset:
    """The config's validation split with the evaluation transform."""
    return build_dataset(cfg.data, "val", eval_transform(cfg.data))


@dataclass
class DiscriminationRow:
    """One checkpoint's traces."""

    name: str
    checkpoint: str
    inter: float
    intra: float
    ratio: float
    pixels: int


def discrimination_table(
    checkpoints: Sequence[str | Path],
    cfg: Config,
    names: Sequence[str] | None = None,
    pixels_per_class: int = 1000,
    classes: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "auto",
    max_images: int | None = None,
    normalize: bool = False,
    progress: bool = True,
) -> list[DiscriminationRow]:
    """Table 5 traces for several checkpoints on the same sampled validation pixels."""
    names = checkpoint_names(checkpoints, names)
    dataset = val_dataset(cfg)
    selection = select_pixels(dataset, pixels_per_class, classes, seed, max_images, progress)
    rows = []
    for name, checkpoint in zip(names, checkpoints):
        predictor = load(checkpoint, device=device, head="linear")
        features, labels = sample_features(predictor, dataset, selection, normalize, progress)
        traces = scatter_traces(features, labels)
        rows.append(
            DiscriminationRow(
                name,
                str(checkpoint),
                traces["inter"],
                traces["intra"],
                traces["ratio"],
                int(labels.numel()),
            )
        )
    return rows


def checkpoint_names(checkpoints: Sequence[str | Path], names: Sequence[str] | None) -> list[str]:
    """Column names: the given ones, else each checkpoint's run folder (or file) name."""
    if names:
        if len(names) != len(checkpoints):
            raise ValueError(
                f"{len(names)} names for {len(checkpoints)} checkpoints; give one "
                "name per checkpoint (--names a,b,...)"
            )
        return list(names)
    paths = [Path(c).absolute() for c in checkpoints]
    # runs/<name>/model.pt -> <name>; runs/<name>/checkpoints/step_N.pt -> <name>/step_N.
    guess = [
        f"{p.parent.parent.name}/{p.stem}"
        if p.parent.name == "checkpoints"
        else p.parent.name or p.stem
        for p in paths
    ]
    return guess if len(set(guess)) == len(guess) else [str(c) for c in checkpoints]


def format_markdown(rows: Sequence[DiscriminationRow]) -> str:
    """A Markdown table: metrics as rows, one column per checkpoint."""
    header = "| | " + " | ".join(r.name for r in rows) + " |"
    lines = [header, "|---" * (len(rows) + 1) + "|"]
    for label, key, fmt in (
        ("tr(inter) / tr(intra) ↑", "ratio", "{:.3f}"),
        ("tr(inter-class var.) ↑", "inter", "{:.3f}"),
        ("tr(intra-class var.) ↓", "intra", "{:.3f}"),
        ("pixels", "pixels", "{:d}"),
    ):
        cells = " | ".join(fmt.format(getattr(r, key)) for r in rows)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def table_paths(out_dir: str | Path) -> tuple[Path, Path]:
    """The two files ``write_table`` writes into ``out_dir`` (markdown, CSV)."""
    out = Path(out_dir)
    return out / "discrimination.md", out / "discrimination.csv"


def write_table(rows: Sequence[DiscriminationRow], out_dir: str | Path) -> tuple[Path, Path]:
    """Write discrimination.md (a column per checkpoint) and discrimination.csv (a row each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = table_paths(out)[0]
    atomic_write_text(md, format_markdown(rows) + "\n")
    path = out / "discrimination.csv"
    # Built in memory, written atomically: a full disk leaves no half table.
    with io.StringIO(newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "checkpoint", "ratio", "inter", "intra", "pixels"])
        for r in rows:
            writer.writerow(
                [
                    r.name,
                    r.checkpoint,
                    f"{r.ratio:.6g}",
                    f"{r.inter:.6g}",
                    f"{r.intra:.6g}",
                    r.pixels,
                ]
            )
        atomic_write_text(path, handle.getvalue())
    return md, path
