"""Layout readers that turn split lines into files, and the segmentation dataset over them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from protoseg.config import DataConfig
from protoseg.data.io import image_size, max_image_pixels, open_image, to_rgb
from protoseg.data.splits import (
    DataError,
    describe_duplicates,
    duplicate_entries,
    read_split_lines,
)

log = logging.getLogger(__name__)

# t(image, mask) -> (image tensor, mask tensor or None); see protoseg.data.transforms.
Transform = Callable[[Image.Image, np.ndarray | None], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Sample:
    """One image, and its label mask when it has one."""

    name: str
    image: Path
    mask: Path | None
    # The mask holds raw ids that the dataset's label_lookup maps to train ids.
    map_ids: bool = False


def _cityscapes_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)
    label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    table[label_ids] = np.arange(len(label_ids), dtype=np.uint8)
    return table


# Cityscapes labelIds (0..33, -1 stored as 255) -> the 19 train ids; everything else 255.
CITYSCAPES_LABEL_ID_TO_TRAIN_ID: np.ndarray = _cityscapes_table()
CITYSCAPES_LABEL_ID_TO_TRAIN_ID.setflags(write=False)


def data_root(cfg: DataConfig) -> Path:
    """data.root as a path ('~' expanded)."""
    return Path(cfg.root).expanduser()


def _relative(line: str) -> PurePosixPath:
    """A split entry as a path below data.root (a leading '/' is dropped, as U2PL does)."""
    rel = PurePosixPath(line.replace("\\", "/").lstrip("/"))
    if ".." in rel.parts:
        raise DataError(f"entry {line!r} climbs out of data.root with '..'; list paths below it")
    return rel


def read_voc(cfg: DataConfig, line: str, needs_mask: bool) -> Sample:
    """VOC: 'name' -> JPEGImages/name.jpg + SegmentationClassAug/name.png, or 'image mask'."""
    root = data_root(cfg)
    parts = line.split()
    if len(parts) == 1:
        name = parts[0]
        image = root / (cfg.image_dir or "JPEGImages") / f"{name}.jpg"
        mask = root / (cfg.mask_dir or "SegmentationClassAug") / f"{name}.png"
    elif len(parts) == 2:
        image_rel, mask_rel = _relative(parts[0]), _relative(parts[1])
        name = image_rel.stem
        image, mask = root / image_rel, root / mask_rel
    else:
        raise DataError(
            f"entry {line!r} has {len(parts)} fields; a VOC line is 'name' or "
            f"'image_path mask_path'"
        )
    return Sample(name=name, image=image, mask=mask if needs_mask else None)


_CITY_IMAGE_SUFFIX = "_leftImg8bit.png"


def read_cityscapes(cfg: DataConfig, line: str, needs_mask: bool) -> Sample:
    """Cityscapes: leftImg8bit/<split>/<city>/<x>_leftImg8bit.png -> gtFine/.../<x>_gtFine_*.png."""
    rel = _relative(line)
    if len(rel.parts) < 2 or not rel.name.endswith(_CITY_IMAGE_SUFFIX):
        raise DataError(
            f"entry {line!r} is not a Cityscapes image path; expected "
            f"leftImg8bit/<split>/<city>/<name>{_CITY_IMAGE_SUFFIX} (is data.layout right?)"
        )
    root = data_root(cfg)
    middle = rel.parts[1:-1]
    name = rel.name[: -len(_CITY_IMAGE_SUFFIX)]
    # data.image_dir / data.mask_dir replace the leading leftImg8bit / gtFine folder.
    image = root.joinpath(cfg.image_dir or rel.parts[0], *middle, rel.name)
    if not needs_mask:
        return Sample(name=name, image=image, mask=None)
    mask_dir = root.joinpath(cfg.mask_dir or "gtFine", *middle)
    train_ids = mask_dir / f"{name}_gtFine_labelTrainIds.png"
    label_ids = mask_dir / f"{name}_gtFine_labelIds.png"
    # Prefer the official train-id export; fall back to mapping the raw ids on load.
    if cfg.map_label_ids and not train_ids.is_file() and label_ids.is_file():
        return Sample(name=name, image=image, mask=label_ids, map_ids=True)
    return Sample(name=name, image=image, mask=train_ids)


_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def read_folder(cfg: DataConfig, line: str, needs_mask: bool) -> Sample:
    """Folder: images/<name>.(jpg|jpeg|png) + masks/<name>.png; unlabelled images need no mask."""
    root = data_root(cfg)
    image_dir = root / (cfg.image_dir or "images")
    rel = _relative(line)
    candidates = [image_dir / f"{rel}{ext}" for ext in _FOLDER_EXTENSIONS]
    if rel.suffix in _FOLDER_EXTENSIONS:
        # An entry written with its extension names the file exactly.
        candidates.insert(0, image_dir / rel)
    image = next((path for path in candidates if path.is_file()), candidates[0])
    name = str(rel.with_suffix("")) if image == image_dir / rel else str(rel)
    mask = root / (cfg.mask_dir or "masks") / f"{name}.png" if needs_mask else None
    return Sample(name=name, image=image, mask=mask)


LAYOUTS: dict[str, Callable[[DataConfig, str, bool], Sample]] = {
    "voc": read_voc,
    "cityscapes": read_cityscapes,
    "folder": read_folder,
}

# Raw-id -> train-id tables for layouts whose readers may set Sample.map_ids.
LABEL_LOOKUPS: dict[str, np.ndarray] = {"cityscapes": CITYSCAPES_LABEL_ID_TO_TRAIN_ID}


_MASK_MODES = ("L", "P", "I", "I;16", "1")


class SegmentationDataset(torch.utils.data.Dataset):
    """Images (and masks) read from disk, checked, and passed through a joint transform.

    ``dataset[i]`` uses the ambient torch RNG; ``dataset[(i, seed)]`` augments under its own
    seed, so the result depends only on (i, seed) and not on which worker or rank loads it.
    Items hold image, index, name, size (H0, W0), and mask for labelled samples; unlabelled
    ones carry ``valid`` instead, a bool (H, W) map that is False on crop padding.

    ``max_pixels`` is the decompression-bomb limit (None: the one in force when the dataset
    is built, see :func:`protoseg.data.io.max_image_pixels`; 0: none). It is stored on the
    dataset so DataLoader workers apply the same limit however they are started.
    ``cache_images`` keeps every image and mask after its first read (``data.cache_images``);
    items are the same with and without it.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: Transform,
        num_classes: int,
        ignore_index: int = 255,
        label_lookup: np.ndarray | None = None,
        max_pixels: int | None = None,
        cache_images: bool = False,
    ) -> None:
        if num_classes <= 0:
            raise DataError(f"num_classes={num_classes} must be > 0; set data.num_classes")
        self.samples = list(samples)
        self.transform = transform
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_lookup = None if label_lookup is None else np.asarray(label_lookup)
        self.max_pixels = max_image_pixels(max_pixels) or 0
        self._cache: dict[int, tuple[Image.Image, np.ndarray | None]] | None = (
            {} if cache_images else None
        )
        # Which samples need their mask ids mapped through label_lookup, by position.
        self.map_ids = [sample.map_ids for sample in self.samples]
        if any(self.map_ids) and self.label_lookup is None:
            first = next(s for s in self.samples if s.map_ids)
            raise DataError(
                f"{first.mask}: mask holds raw ids that need a label_lookup table, but none "
                f"was given; pass label_lookup (e.g. CITYSCAPES_LABEL_ID_TO_TRAIN_ID)"
            )
        # Masks travel as uint8 through the transforms when every id fits (faster resizes).
        self._small_ids = num_classes <= 256 and 0 <= ignore_index <= 255
        # Label value of real pixels in the padding probe of unlabelled images: any non-ignore.
        self._real_marker = 1 if ignore_index == 0 else 0

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The 8-bit RGB image of sample ``index``, read as ``predict`` reads it (to_rgb)."""
        return to_rgb(open_image(self.samples[index].image, "image", self.max_pixels))

    def load_mask(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """The checked (H, W) label mask of sample ``index``; None for unlabelled samples."""
        sample = self.samples[index]
        if sample.mask is None:
            return None
        image = open_image(sample.mask, "mask", self.max_pixels)
        if image.mode not in _MASK_MODES:
            raise DataError(
                f"{sample.mask}: mask has mode {image.mode!r}; masks hold one class id per pixel "
                f"(greyscale or palette PNG), so convert colour-coded masks to ids first"
            )
        if size is not None and image.size != size:
            raise DataError(
                f"{sample.mask}: mask is {image.size[0]}x{image.size[1]} but its image "
                f"{sample.image} is {size[0]}x{size[1]} (WxH); regenerate the mask or fix the "
                f"split entry so both belong to the same picture"
            )
        mask = np.array(image)
        if image.mode == "1":
            mask = mask.astype(np.uint8)
        if self.map_ids[index]:
            mask = self._map_ids(mask, sample.mask)
        self._check_values(mask, sample.mask)
        return mask.astype(np.uint8 if self._small_ids else np.int64, copy=False)

    def _map_ids(self, mask: np.ndarray, path: Path) -> np.ndarray:
        assert self.label_lookup is not None
        if mask.min() < 0 or mask.max() >= len(self.label_lookup):
            raise DataError(
                f"{path}: raw ids outside the {len(self.label_lookup)}-entry label lookup; "
                f"is this really a labelIds file? set data.map_label_ids=false to read it as is"
            )
        return self.label_lookup[mask]

    def _check_values(self, mask: np.ndarray, path: Path) -> None:
        valid = (mask >= 0) & (mask < self.num_classes)
        valid |= mask == self.ignore_index
        if valid.all():
            return
        bad = np.unique(mask[~valid])
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"{path}: label values {shown} are outside [0, {self.num_classes}) and are not the "
            f"ignore index {self.ignore_index}; raise data.num_classes to cover them, set "
            f"data.ignore_index to the value that marks unlabelled pixels, or remap the masks"
        )

    def _read(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The image and checked mask of sample ``index``, from the cache when it is on."""
        if self._cache is None or index not in self._cache:
            image = self.load_image(index)
            read = (image, self.load_mask(index, image.size))
            if self._cache is None:
                return read
            self._cache[index] = read
        image, mask = self._cache[index]
        # The transforms may hand the mask's memory on; the cached one must stay as read.
        return image, None if mask is None else mask.copy()

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key`` (an index, or (index, aug_seed)) as a dict of tensors and metadata."""
        if isinstance(key, tuple):
            index, aug_seed = int(key[0]), int(key[1])
        else:
            index, aug_seed = int(key), None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        image, mask = self._read(index)
        probe = None
        if mask is None:
            # An all-"real" stand-in label rides through the same geometry, so the crop's
            # padding is known for unlabelled images too (item["valid"]).
            probe = np.full((image.height, image.width), self._real_marker, np.uint8)
        if aug_seed is None:
            image_t, mask_t = self.transform(image, mask if probe is None else probe)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator alone: the transforms draw nothing else, and
                # torch.manual_seed would also queue (per item, with a stack trace) a seeding
                # of every accelerator generator, which fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(aug_seed)
                image_t, mask_t = self.transform(image, mask if probe is None else probe)
        item: dict[str, Any] = {
            "image": image_t,
            "index": index,
            "name": self.samples[index].name,
            "size": (image.height, image.width),
        }
        if mask_t is not None:
            if probe is None:
                item["mask"] = mask_t
            else:
                item["valid"] = mask_t == self._real_marker
        return item


_SPLIT_KEYS = {
    "labeled": "labeled_split",
    "unlabeled": "unlabeled_split",
    "val": "val_split",
}


def split_path(cfg: DataConfig, split: str) -> Path:
    """The split file that cfg names for ``split`` ('labeled', 'unlabeled' or 'val')."""
    if split not in _SPLIT_KEYS:
        raise DataError(f"split {split!r} is unknown; choose one of {', '.join(_SPLIT_KEYS)}")
    key = _SPLIT_KEYS[split]
    value = getattr(cfg, key)
    if not value:
        if split == "unlabeled":
            raise DataError(
                "data.unlabeled_split is empty, but a semi-supervised method needs "
                "data.unlabeled_split: set it to the unlabelled list (e.g. splits/92/unlabeled.txt)"
            )
        raise DataError(f"data.{key} is empty; set it to the {split} split file")
    path = Path(value).expanduser()
    return path if path.is_absolute() else data_root(cfg) / path


def build_dataset(
    cfg: DataConfig, split: str, transform: Transform, max_pixels: int | None = None
) -> SegmentationDataset:
    """The dataset of one split ('labeled', 'unlabeled' or 'val') as configured by cfg.

    A line listed twice is refused in the val split (it would count twice in the mIoU) and
    kept with a warning in training splits (it only doubles that image's sampling weight).
    With ``data.check_files`` every file is checked before training starts: it exists, its
    header reads, it is within the pixel limit (``max_pixels``, see SegmentationDataset),
    each mask matches its image's size, and a labelled split has at least one labelled pixel.
    """
    root = data_root(cfg)
    if not root.is_dir():
        raise DataError(
            f"data.root={cfg.root!r} ({root.absolute()}) does not exist: download the dataset "
            f"or set data.root=<folder that holds it>"
        )
    if cfg.layout not in LAYOUTS:
        raise DataError(
            f"data.layout={cfg.layout!r} is unknown; choose one of {', '.join(sorted(LAYOUTS))}"
        )
    reader = LAYOUTS[cfg.layout]
    path = split_path(cfg, split)
    needs_mask = split != "unlabeled"
    entries = read_split_lines(path, f"data.{_SPLIT_KEYS[split]}")
    _check_duplicates(entries, path, split)
    samples: list[Sample] = []
    line_numbers: list[int] = []
    for number, line in entries:
        try:
            samples.append(reader(cfg, line, needs_mask))
        except DataError as exc:
            raise DataError(f"{path}, line {number}: {exc}") from None
        line_numbers.append(number)
    if cfg.check_files:
        _check_files(samples, line_numbers, path)
    dataset = SegmentationDataset(
        samples,
        transform,
        num_classes=cfg.num_classes,
        ignore_index=cfg.ignore_index,
        label_lookup=LABEL_LOOKUPS.get(cfg.layout) if cfg.map_label_ids else None,
        max_pixels=max_pixels,
        cache_images=cfg.cache_images,
    )
    if cfg.check_files:
        _check_headers(dataset, line_numbers, path)
        if needs_mask:
            _check_some_labels(dataset, path)
    return dataset


def _check_duplicates(entries: list[tuple[int, str]], path: Path, split: str) -> None:
    duplicates = duplicate_entries(entries)
    if not duplicates:
        return
    listed = describe_duplicates(duplicates)
    if split == "val":
        raise DataError(
            f"{path}: {len(duplicates)} entries are listed more than once ({listed}); each "
            f"would count twice in the validation mIoU: delete the repeated lines"
        )
    log.warning(
        "%s: %d entries are listed more than once (%s); each repeat doubles that image's "
        "sampling weight: delete the repeated lines unless that is intended",
        path,
        len(duplicates),
        listed,
    )


def _check_files(samples: list[Sample], line_numbers: list[int], split_file: Path) -> None:
    missing: list[tuple[Path, int]] = []
    total = 0
    for sample, number in zip(samples, line_numbers):
        for file in (sample.image, sample.mask):
            if file is None:
                continue
            total += 1
            if not file.is_file():
                missing.append((file, number))
    if missing:
        file, number = missing[0]
        raise DataError(
            f"{file}: file not found (from {split_file}, line {number}); {len(missing)} of "
            f"{total} files this split references are missing. Check data.root, data.layout "
            f"and data.image_dir / data.mask_dir, or remove the entries from the split file"
        )


def _check_headers(dataset: SegmentationDataset, line_numbers: list[int], split_file: Path) -> None:
    """Read every header (not the pixels): unreadable files, bombs and size mismatches."""
    limit = dataset.max_pixels
    for sample, number in zip(dataset.samples, line_numbers):
        try:
            size = image_size(sample.image, "image", limit)
            if sample.mask is not None:
                mask_size = image_size(sample.mask, "mask", limit)
                if mask_size != size:
                    raise DataError(
                        f"{sample.mask}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                        f"{sample.image} is {size[0]}x{size[1]} (WxH); regenerate the mask or "
                        f"fix the split entry so both belong to the same picture"
                    )
        except DataError as exc:
            raise DataError(f"{exc} (from {split_file}, line {number})") from None


def _check_some_labels(dataset: SegmentationDataset, split_file: Path) -> None:
    """Refuse a labelled split whose masks hold nothing but the ignore index.

    Masks are decoded until one has a labelled pixel, which is normally the first one.
    """
    for index in range(len(dataset)):
        mask = dataset.load_mask(index)
        if mask is not None and (mask != dataset.ignore_index).any():
            return
    raise DataError(
        f"{split_file}: every mask of its {len(dataset)} entries holds only the ignore index "
        f"{dataset.ignore_index}, so training would learn nothing (loss 0); check "
        f"data.mask_dir (are these the right masks?) and data.ignore_index"
    )
