"""Folder prediction: palette masks and side-by-side overlays for every image of some inputs.

An unreadable image is skipped with a warning and listed in the returned summary (the
command exits 1 when any were skipped), so one corrupt file does not stop a long run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from protoseg.analysis.legend import legend_entries, legend_strip
from protoseg.config import EvalConfig
from protoseg.data import colorize, image_size, read_rgb, save_mask_png, to_rgb
from protoseg.files import atomic_write
from protoseg.inference import Predictor
from protoseg.outputs import file_identity
from protoseg.progress import show_progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
OVERLAY_ALPHA = 0.5


@dataclass
class PredictSummary:
    """What ``predict_paths`` wrote and which inputs it had to skip (path, reason)."""

    masks: list[Path] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: Sequence[str | Path], recursive: bool = False) -> list[tuple[Path, Path]]:
    """(image, path relative to its input folder) for every image file the inputs name."""
    found: list[tuple[Path, Path]] = []
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"input not found: {', '.join(missing)}; pass image files or folders that exist"
        )
    for entry in map(Path, inputs):
        if entry.is_file():
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"{entry}: not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
                )
            found.append((entry, Path(entry.name)))
            continue
        pattern = entry.rglob("*") if recursive else entry.iterdir()
        found += sorted((p, p.relative_to(entry)) for p in pattern if _is_image(p))
    if not found:
        hint = "" if recursive else " (add --recursive to search sub-folders)"
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, inputs))}"
            f"{hint}"
        )
    return found


def check_outputs(
    inputs: Sequence[str | Path],
    images: list[tuple[Path, Path]],
    names: list[Path],
    out: Path,
    recursive: bool,
    overlays: bool,
    overwrite: bool,
) -> None:
    """Refuse a prediction that would overwrite its inputs or, unless asked, earlier results."""
    out_abs = out.resolve()
    if recursive:
        for folder in (Path(p).resolve() for p in inputs if Path(p).is_dir()):
            if out_abs == folder or folder in out_abs.parents:
                raise ValueError(
                    f"--out {out} is inside the input folder {folder} searched with --recursive: "
                    "the masks would be read back as inputs; choose an --out outside it"
                )
    planned = [out / f"{name}.png" for name in names]
    if overlays:
        planned += [out / "overlay" / f"{name}.jpg" for name in names]
    # Compared as files (device and inode), so a hard link or symlink to an input is caught
    # too; an output that does not exist yet cannot be an input.
    sources = {file_identity(path) for path, _ in images}
    clash = [p for p in planned if p.exists() and file_identity(p) in sources]
    if clash:
        raise ValueError(
            f"--out {out} would overwrite the input image {clash[0]}; choose another --out "
            "folder (input files are never replaced)"
        )
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{len(existing)} output file(s) already exist in {out} (e.g. {existing[0]}); "
            "pass --overwrite to replace them, or choose another --out folder"
        )


def _output_names(images: list[tuple[Path, Path]]) -> list[Path]:
    """Output path stems (relative, no suffix); two inputs that would share one are an error."""
    owners: dict[Path, Path] = {}
    names = []
    for path, rel in images:
        name = rel.with_suffix("")
        if name in owners:
            raise ValueError(
                f"{owners[name]} and {path} would both be written as {name}.png; "
                "rename one or predict them into separate --out folders"
            )
        owners[name] = path
        names.append(name)
    return names


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into 8-bit RGB (the training reader, with its pixel limit);
    ValueError (a DataError) names the file if that fails."""
    return read_rgb(path)


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    palette: Sequence[tuple[int, int, int]],
    alpha: float = OVERLAY_ALPHA,
    class_names: Sequence[str] = (),
) -> Image.Image:
    """The image and, to its right, the image blended with the coloured mask; below both, a
    legend strip of the classes present in ``mask`` (ids without a name read ``class <id>``).
    """
    rgb = np.asarray(to_rgb(image), dtype=np.float32)
    blend = (1.0 - alpha) * rgb + alpha * colorize(mask, palette).astype(np.float32)
    side = np.clip(np.concatenate([rgb, blend], axis=1) + 0.5, 0, 255).astype(np.uint8)
    # Labels stay legible from thumbnails up to Cityscapes-sized frames.
    font_size = max(12, round(0.035 * side.shape[0]))
    strip = legend_strip(legend_entries([mask], class_names, palette), side.shape[1], font_size)
    canvas = Image.new("RGB", (strip.width, side.shape[0] + strip.height), (255, 255, 255))
    canvas.paste(Image.fromarray(side), (0, 0))
    canvas.paste(strip, (0, side.shape[0]))
    return canvas


def _size_groups(
    images: list[tuple[Path, Path]], names: list[Path], batch_size: int, summary: PredictSummary
) -> Iterator[list[tuple[Path, Path]]]:
    """Batches of (image, output name) that share a size; headers only are read here."""
    groups: dict[tuple[int, int], list[tuple[Path, Path]]] = defaultdict(list)
    for (path, _), name in zip(images, names):
        try:
            size = image_size(path)
        except ValueError as exc:
            log.warning("skipping %s: cannot read image (%s)", path, exc)
            summary.failed.append((path, str(exc)))
            continue
        groups[size].append((path, name))
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start : start + batch_size]


def predict_paths(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    eval_cfg: EvalConfig | None = None,
    batch_size: int = 1,
    recursive: bool = False,
    overlays: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictSummary:
    """Write ``<out>/<name>.png`` masks (and ``<out>/overlay/<name>.jpg``) for every input image.

    Nothing is written when an output would replace an input image or, unless
    ``overwrite``, an existing file (see ``check_outputs``).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    images = find_images(inputs, recursive)
    names = _output_names(images)
    out = Path(out_dir)
    check_outputs(inputs, images, names, out, recursive, overlays, overwrite)
    summary = PredictSummary()
    # Headers are read up front, so the bar counts only the images that will be predicted.
    batches = list(_size_groups(images, names, batch_size, summary))
    total = sum(len(b) for b in batches)
    bar = tqdm(
        total=total,
        desc="predict",
        unit="img",
        disable=not show_progress(progress),
        dynamic_ncols=True,
    )
    try:
        for batch in batches:
            loaded: list[tuple[Image.Image, Path]] = []
            for path, name in batch:
                try:
                    loaded.append((read_image(path), name))
                except ValueError as exc:
                    log.warning("skipping %s", exc)
                    summary.failed.append((path, str(exc)))
            masks = predictor.predict_batch([image for image, _ in loaded], eval_cfg)
            for (image, name), mask in zip(loaded, masks):
                _write(image, mask, name, out, predictor, overlays, summary)
            bar.update(len(batch))
    finally:
        bar.close()
    return summary


def _write(
    image: Image.Image,
    mask: np.ndarray,
    name: Path,
    out: Path,
    predictor: Predictor,
    overlays: bool,
    summary: PredictSummary,
) -> None:
    # Appending keeps dots inside file names ("img.v2") that with_suffix would cut.
    mask_path = out / f"{name}.png"
    atomic_write(mask_path, lambda handle: save_mask_png(mask, handle, predictor.palette))
    summary.masks.append(mask_path)
    if overlays:
        overlay_path = out / "overlay" / f"{name}.jpg"
        legended = overlay(image, mask, predictor.palette, class_names=predictor.class_names)
        atomic_write(overlay_path, lambda handle: legended.save(handle, "JPEG", quality=90))
        summary.overlays.append(overlay_path)
