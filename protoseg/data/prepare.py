"""Turning the official dataset downloads into the layouts protoseg reads.

``prepare_voc`` builds PASCAL VOC 2012's augmented label set, ``SegmentationClassAug``:
the SBD class masks (``benchmark_RELEASE/dataset/cls/*.mat``) converted to PNG and merged
with VOC 2012's own ``SegmentationClass`` masks, VOC's taking precedence for an image that
has both. Every output mask is a greyscale ('L') PNG of class ids 0-20 with 255 = ignore.
VOC's masks mark a 5-pixel ignore band along object outlines; SBD's have none, so images
labelled by SBD alone carry no 255 pixels (the same holds in the widely used archive).

``prepare_cityscapes`` writes ``*_gtFine_labelTrainIds.png`` beside each
``*_gtFine_labelIds.png``, as the Cityscapes scripts' ``createTrainIdLabelImgs`` does.

Neither copies the paper's split lists into protoseg: a user who has the U2PL code's
``data/splits`` folder passes it as ``splits_dir`` and its lists are checked against the
prepared data and installed under ``<out>/splits/<dataset>/``, where the shipped configs
look for them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from protoseg.data.datasets import CITYSCAPES_LABEL_ID_TO_TRAIN_ID
from protoseg.data.io import image_size, open_image
from protoseg.data.splits import DataError, read_split, read_split_lines
from protoseg.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

# The sizes of the standard sets: SBD train + val + VOC train minus VOC val, and VOC val.
VOC_TRAIN_AUG_COUNT = 10_582
VOC_VAL_COUNT = 1_449
VOC_NUM_CLASSES = 21
# gtFine images per split (test masks exist but hold no real labels).
CITYSCAPES_COUNTS = {"train": 2_975, "val": 500, "test": 1_525}

_VOC_DOWNLOAD = (
    "the PASCAL VOC 2012 trainval download (VOCtrainval_11-May-2012.tar, which unpacks to "
    "VOCdevkit/VOC2012); point --voc at that VOC2012 folder"
)
_SBD_DOWNLOAD = (
    "the Semantic Boundaries Dataset download (benchmark.tgz, which unpacks to "
    "benchmark_RELEASE/dataset/{cls,img,inst} with train.txt and val.txt); point --sbd at "
    "benchmark_RELEASE"
)
_U2PL_SPLITS = (
    "point --splits at the data/splits folder of the U2PL code release, which holds "
    "pascal/<n>/labeled.txt, pascal/val.txt, cityscapes/<n>/labeled.txt and cityscapes/val.txt"
)
_CITY_DOWNLOAD = "gtFine_trainvaltest.zip from the Cityscapes site"
_LABEL_IDS = "_gtFine_labelIds.png"
_TRAIN_IDS = "_gtFine_labelTrainIds.png"


@dataclass
class VocSummary:
    """What ``prepare_voc`` made."""

    out_dir: Path
    train_aug: int
    val: int
    from_voc: int
    from_sbd: int
    # How out_dir/JPEGImages was provided: "symlink", "copy" or "in place".
    images: str
    # False when the set sizes differ from VOC_TRAIN_AUG_COUNT / VOC_VAL_COUNT.
    complete: bool
    split_files: list[Path] = field(default_factory=list)


@dataclass
class CityscapesSummary:
    """What ``prepare_cityscapes`` made: masks written and kept, per gtFine split."""

    root: Path
    written: dict[str, int]
    kept: dict[str, int]
    complete: bool
    split_files: list[Path] = field(default_factory=list)


# ---- shared pieces ---------------------------------------------------------------------------
def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a greyscale PNG through a temporary file, so an interrupted run leaves no half file."""
    image = Image.fromarray(array)
    atomic_write(path, lambda handle: image.save(handle, format="PNG"), durable=False)


def _check_ids(ids: np.ndarray, path: Path, num_classes: int, hint: str) -> np.ndarray:
    """The mask as uint8 class ids, or DataError when it holds anything but 0..n-1 and 255."""
    bad = np.setdiff1d(np.unique(ids), [*range(num_classes), 255])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10])
        raise DataError(
            f"{path}: values {shown} are not class ids 0-{num_classes - 1} or 255; {hint}"
        )
    return ids.astype(np.uint8)


def _run(jobs: Sequence[tuple], func: Callable[[tuple], object], workers: int) -> None:
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            # list() re-raises the first worker error (a DataError naming its file) here.
            list(pool.map(func, jobs, chunksize=32))
    else:
        for job in jobs:
            func(job)


def _split_plan(
    splits_dir: str | Path, dataset: str, out: Path, known: Callable[[str, str], str]
) -> list[tuple[Path, str]]:
    """(target, text) of every split list of ``dataset``, each entry checked by ``known``.

    ``known(kind, entry)`` returns "" for an entry the prepared data holds, else the reason;
    kind is the file's stem (labeled, unlabeled, val, ...).
    """
    base = Path(splits_dir).expanduser()
    source = base / dataset
    if not source.is_dir() and (base / "val.txt").is_file() and base.name == dataset:
        source = base  # pointed at splits/<dataset> itself
    if not source.is_dir():
        raise DataError(f"{base}: no {dataset}/ folder of split lists; {_U2PL_SPLITS}")
    files = sorted(source.rglob("*.txt"))
    if not files:
        raise DataError(f"{source}: holds no .txt split lists; {_U2PL_SPLITS}")
    plan = []
    for file in files:
        entries = read_split_lines(file)
        for number, entry in entries:
            reason = known(file.stem, entry)
            if reason:
                raise DataError(
                    f"{file}, line {number}: {entry!r} {reason}; these split lists do not "
                    f"match the prepared data (is --splits (splits_dir) the right folder, and "
                    f"are the downloads complete?)"
                )
        text = "".join(f"{entry}\n" for _, entry in entries)
        plan.append((out / "splits" / dataset / file.relative_to(source), text))
    return plan


def _refuse_changed(plan: Sequence[tuple[Path, str]], force: bool) -> None:
    """Refuse, before anything is written, to replace a text file with other content."""
    if force:
        return
    for target, text in plan:
        if target.exists() and not (target.is_file() and target.read_text() == text):
            raise DataError(
                f"{target}: already exists with other content; pass --force (force=True) "
                f"to replace it"
            )


def _write_texts(plan: Sequence[tuple[Path, str]]) -> list[Path]:
    """Write each (target, text); a file that already holds its text is left untouched."""
    for target, text in plan:
        if not (target.is_file() and target.read_text() == text):
            atomic_write_text(target, text)
    return [target for target, _ in plan]


# ---- PASCAL VOC 2012 + SBD -------------------------------------------------------------------
def _voc_folder(voc_dir: str | Path) -> Path:
    voc = Path(voc_dir).expanduser()
    if not voc.is_dir():
        raise DataError(f"{voc}: folder not found; it should be {_VOC_DOWNLOAD}")
    if not (voc / "JPEGImages").is_dir() and (voc / "VOC2012" / "JPEGImages").is_dir():
        voc = voc / "VOC2012"  # pointed at VOCdevkit
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        if not (voc / sub).is_dir():
            raise DataError(f"{voc / sub}: folder not found; --voc must be {_VOC_DOWNLOAD}")
    return voc


def _sbd_folder(sbd_dir: str | Path) -> Path:
    sbd = Path(sbd_dir).expanduser()
    if not sbd.is_dir():
        raise DataError(f"{sbd}: folder not found; it should be {_SBD_DOWNLOAD}")
    if (sbd / "dataset" / "cls").is_dir():
        sbd = sbd / "dataset"  # benchmark_RELEASE itself
    if not (sbd / "cls").is_dir():
        raise DataError(
            f"{sbd / 'dataset' / 'cls'}: folder not found; --sbd must be {_SBD_DOWNLOAD}"
        )
    return sbd


def _missing(paths: Iterable[Path], what: str, fix: str) -> None:
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise DataError(f"{absent[0]}: {what} not found ({len(absent)} missing in all); {fix}")


def read_sbd_mat(path: str | Path) -> np.ndarray:
    """The class-id mask (H, W) uint8 of one SBD ``cls/*.mat`` file (struct GTcls.Segmentation)."""
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_SBD_DOWNLOAD}") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise DataError(
            f"{path}: cannot read this .mat file ({type(exc).__name__}: {exc}); re-extract "
            f"benchmark.tgz"
        ) from None
    struct = mat.get("GTcls")
    segmentation = getattr(struct, "Segmentation", None)
    if segmentation is None:
        raise DataError(
            f"{path}: holds no GTcls.Segmentation (keys: {', '.join(sorted(mat))}); SBD class "
            f"masks are in dataset/cls (not dataset/inst): check --sbd"
        )
    ids = np.asarray(segmentation)
    if ids.ndim != 2:
        raise DataError(f"{path}: GTcls.Segmentation has shape {ids.shape}, not (H, W)")
    return ids


def _convert_voc_job(job: tuple[str, str, str, str]) -> None:
    kind, source, image, target = job
    src = Path(source)
    if kind == "voc":
        mask = open_image(src, "mask")
        if mask.mode not in ("P", "L"):
            raise DataError(
                f"{src}: mask has mode {mask.mode!r}; VOC class masks are palette PNGs whose "
                f"indices are the class ids: use SegmentationClass from the VOC download"
            )
        ids = np.asarray(mask)
        hint = "is this SegmentationObject instead of SegmentationClass?"
    else:
        ids = read_sbd_mat(src)
        hint = "is this an SBD inst/ file instead of cls/?"
    ids = _check_ids(ids, src, VOC_NUM_CLASSES, hint)
    width, height = image_size(image)
    if ids.shape != (height, width):
        raise DataError(
            f"{src}: mask is {ids.shape[1]}x{ids.shape[0]} but its image {image} is "
            f"{width}x{height} (WxH); the VOC and SBD downloads do not match: re-download them"
        )
    _save_png(ids, Path(target))


def prepare_voc(
    voc_dir: str | Path,
    sbd_dir: str | Path,
    out_dir: str | Path,
    splits_dir: str | Path | None = None,
    force: bool = False,
    copy_images: bool = False,
    workers: int = 1,
) -> VocSummary:
    """Build ``out_dir`` for ``data.layout=voc``: JPEGImages, SegmentationClassAug, lists, splits.

    - ``out_dir/JPEGImages``: a symlink to VOC's folder (no copy, instant), or with
      ``copy_images`` a copy of the 12,031 images the masks cover (about 1.5 GB); when
      ``out_dir`` is ``voc_dir`` itself the images are used in place.
    - ``out_dir/SegmentationClassAug/<id>.png``: 'L' PNGs of class ids (255 = ignore) for
      train_aug (SBD train + val + VOC train, minus VOC val) and VOC val.
    - ``out_dir/ImageSets/SegmentationAug/{train_aug,val}.txt``: those two lists.
    - with ``splits_dir`` (the U2PL ``data/splits`` folder): its ``pascal/`` lists, checked
      against the prepared set, copied to ``out_dir/splits/pascal/``.

    Set sizes other than 10,582 / 1,449 give a warning (``complete`` False); files the lists
    name but the downloads lack are an error. Existing outputs that would change are
    replaced only with ``force``; nothing is written before every check has passed.
    """
    voc = _voc_folder(voc_dir)
    sbd = _sbd_folder(sbd_dir)
    out = Path(out_dir).expanduser()
    lists = voc / "ImageSets" / "Segmentation"
    voc_train = read_split(lists / "train.txt")
    voc_val = read_split(lists / "val.txt")
    for name in ("train.txt", "val.txt"):
        if not (sbd / name).is_file():
            raise DataError(
                f"{sbd / name}: SBD image list not found; --sbd must be {_SBD_DOWNLOAD}"
            )
    sbd_names = read_split(sbd / "train.txt") + read_split(sbd / "val.txt")
    val_set = set(voc_val)
    train_aug = sorted(set(sbd_names + voc_train) - val_set)
    val = list(dict.fromkeys(voc_val))
    from_voc = set(voc_train) | val_set
    wanted = sorted(set(train_aug) | val_set)

    voc_masks = voc / "SegmentationClass"
    _missing(
        (voc_masks / f"{n}.png" for n in sorted(from_voc)),
        "VOC class mask",
        f"the VOC download is incomplete: re-extract {_VOC_DOWNLOAD}",
    )
    _missing(
        (sbd / "cls" / f"{n}.mat" for n in wanted if n not in from_voc),
        "SBD class mask",
        f"the SBD download is incomplete: re-extract {_SBD_DOWNLOAD}",
    )
    _missing(
        (voc / "JPEGImages" / f"{n}.jpg" for n in wanted),
        "image",
        f"VOC's JPEGImages lacks it: re-extract {_VOC_DOWNLOAD}",
    )
    complete = len(train_aug) == VOC_TRAIN_AUG_COUNT and len(val) == VOC_VAL_COUNT
    if not complete:
        log.warning(
            "train_aug has %d images (expected %d) and val %d (expected %d), from %s and %s: "
            "these are not the VOC 2012 + SBD releases the paper used, so results will not "
            "compare with it",
            len(train_aug),
            VOC_TRAIN_AUG_COUNT,
            len(val),
            VOC_VAL_COUNT,
            lists,
            sbd,
        )

    # Every check on the outputs comes before the first write.
    mask_dir = out / "SegmentationClassAug"
    if mask_dir.is_dir() and not force:
        present = sum(1 for _ in mask_dir.glob("*.png"))
        if present:
            raise DataError(
                f"{mask_dir}: already holds {present} masks; pass --force (force=True) to "
                f"rebuild them, or choose another --out folder"
            )
    wanted_set = set(wanted)
    train_set = set(train_aug)

    def known(kind: str, entry: str) -> str:
        if kind == "val":
            return "" if entry in val_set else "is not a VOC 2012 val image"
        if kind == "labeled" or kind == "unlabeled":
            return "" if entry in train_set else "is not in train_aug"
        return "" if entry in wanted_set else "is not in train_aug or val"

    plan = _split_plan(splits_dir, "pascal", out, known) if splits_dir is not None else []
    list_dir = out / "ImageSets" / "SegmentationAug"
    lists_plan = [
        (list_dir / "train_aug.txt", "".join(f"{n}\n" for n in train_aug)),
        (list_dir / "val.txt", "".join(f"{n}\n" for n in val)),
    ]
    _refuse_changed(plan + lists_plan, force)
    images = _place_images(voc / "JPEGImages", out / "JPEGImages", wanted, force, copy_images)

    mask_dir.mkdir(parents=True, exist_ok=True)
    jpegs = voc / "JPEGImages"
    jobs = [
        (
            "voc" if n in from_voc else "sbd",
            str(voc_masks / f"{n}.png" if n in from_voc else sbd / "cls" / f"{n}.mat"),
            str(jpegs / f"{n}.jpg"),
            str(mask_dir / f"{n}.png"),
        )
        for n in wanted
    ]
    log.info("writing %d masks to %s", len(jobs), mask_dir)
    _run(jobs, _convert_voc_job, workers)
    _write_texts(lists_plan)
    split_files = _write_texts(plan)
    if splits_dir is None:
        log.info(
            "no split lists installed (splits_dir not given); the shipped voc configs read "
            "%s/splits/pascal/<n>/labeled.txt: %s",
            out,
            _U2PL_SPLITS,
        )
    return VocSummary(
        out_dir=out,
        train_aug=len(train_aug),
        val=len(val),
        from_voc=sum(1 for n in wanted if n in from_voc),
        from_sbd=sum(1 for n in wanted if n not in from_voc),
        images=images,
        complete=complete,
        split_files=split_files,
    )


def _place_images(source: Path, target: Path, names: Sequence[str], force: bool, copy: bool) -> str:
    """Provide ``target`` (out_dir/JPEGImages) as a symlink to ``source`` or a copy of it."""
    if target.exists() and target.resolve() == source.resolve():
        # out_dir is the VOC folder itself, or a link made by an earlier run.
        return "in place" if not target.is_symlink() else "symlink"
    if target.is_symlink():
        if not force:
            raise DataError(
                f"{target}: already exists as a link to {os.readlink(target)}; pass --force "
                f"(force=True) to replace the link"
            )
        target.unlink()  # the link only: no image is deleted
    elif target.exists() and not (copy and force and target.is_dir()):
        raise DataError(
            f"{target}: already exists as a folder of its own, and protoseg deletes no images: "
            f"remove or rename it, or pass --force with --copy-images to copy over it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            target.symlink_to(source.resolve(), target_is_directory=True)
        except OSError as exc:
            raise DataError(
                f"{target}: cannot create a symlink to {source} ({exc}); pass --copy-images "
                f"(copy_images=True) to copy the images instead"
            ) from None
        return "symlink"
    target.mkdir(exist_ok=True)
    log.info("copying %d images to %s", len(names), target)
    for name in names:
        shutil.copy2(source / f"{name}.jpg", target / f"{name}.jpg")
    return "copy"


# ---- Cityscapes ------------------------------------------------------------------------------
def _convert_city_job(job: tuple[str, str]) -> None:
    source, target = Path(job[0]), Path(job[1])
    mask = open_image(source, "mask")
    if mask.mode not in ("L", "P"):
        raise DataError(
            f"{source}: mode {mask.mode!r}, but a labelIds file is an 8-bit greyscale PNG "
            f"of label ids; re-extract {_CITY_DOWNLOAD}"
        )
    _save_png(CITYSCAPES_LABEL_ID_TO_TRAIN_ID[np.asarray(mask)], target)


def prepare_cityscapes(
    root: str | Path,
    force: bool = False,
    workers: int = 1,
    splits_dir: str | Path | None = None,
) -> CityscapesSummary:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png`` under root.

    The 19 train ids come from CITYSCAPES_LABEL_ID_TO_TRAIN_ID (every other id -> 255).
    Existing train-id files (e.g. from the official scripts) are kept unless ``force``, so
    an interrupted run resumes where it stopped. With ``splits_dir`` (the U2PL
    ``data/splits`` folder) its ``cityscapes/`` lists are checked and copied to
    ``root/splits/cityscapes/``. Split sizes other than 2,975 train / 500 val give a warning.
    """
    root = Path(root).expanduser()
    gt = root / "gtFine"
    if not gt.is_dir():
        hint = f" (pass its parent, {root.parent})" if root.name == "gtFine" else ""
        raise DataError(
            f"{gt}: folder not found{hint}; download {_CITY_DOWNLOAD} and unzip it into "
            f"{root}, which makes gtFine/train, gtFine/val and gtFine/test"
        )
    if not (root / "leftImg8bit").is_dir():
        log.warning(
            "%s: no leftImg8bit/ folder yet; training also needs leftImg8bit_trainvaltest.zip "
            "unzipped there",
            root,
        )
    sources = sorted(gt.glob(f"*/*/*{_LABEL_IDS}"))
    if not sources:
        raise DataError(
            f"{gt}: no <split>/<city>/*{_LABEL_IDS} files; the gtFine download is incomplete: "
            f"re-extract {_CITY_DOWNLOAD}"
        )
    written: dict[str, int] = {}
    kept: dict[str, int] = {}
    jobs = []
    for source in sources:
        split = source.relative_to(gt).parts[0]
        target = source.with_name(source.name[: -len(_LABEL_IDS)] + _TRAIN_IDS)
        if target.is_file() and not force:
            kept[split] = kept.get(split, 0) + 1
            continue
        written[split] = written.get(split, 0) + 1
        jobs.append((str(source), str(target)))
    counts = {s: written.get(s, 0) + kept.get(s, 0) for s in set(written) | set(kept)}
    complete = all(counts.get(s, 0) == CITYSCAPES_COUNTS[s] for s in ("train", "val"))
    if not complete:
        log.warning(
            "%s: gtFine holds %d train and %d val label files (expected %d and %d); the "
            "download is partial or not Cityscapes fine",
            gt,
            counts.get("train", 0),
            counts.get("val", 0),
            CITYSCAPES_COUNTS["train"],
            CITYSCAPES_COUNTS["val"],
        )

    def known(kind: str, entry: str) -> str:
        line = entry.replace("\\", "/").lstrip("/")
        parts = line.split("/")
        if (
            len(parts) != 4
            or parts[0] != "leftImg8bit"
            or not parts[3].endswith("_leftImg8bit.png")
        ):
            return "is not a leftImg8bit/<split>/<city>/<name>_leftImg8bit.png path"
        stem = parts[3][: -len("_leftImg8bit.png")]
        if not (gt / parts[1] / parts[2] / f"{stem}{_LABEL_IDS}").is_file():
            return f"has no {stem}{_LABEL_IDS} in {gt / parts[1] / parts[2]}"
        return ""

    plan = _split_plan(splits_dir, "cityscapes", root, known) if splits_dir is not None else []
    _refuse_changed(plan, force)
    log.info("writing %d train-id masks under %s (%d kept)", len(jobs), gt, sum(kept.values()))
    _run(jobs, _convert_city_job, workers)
    return CityscapesSummary(
        root=root,
        written=written,
        kept=kept,
        complete=complete,
        split_files=_write_texts(plan),
    )
