"""A small synthetic segmentation dataset with real intra-class variation.

Every object class comes in three visual *modes* (colour palette, texture and shape variant)
drawn with skewed frequencies, so a handful of labelled images rarely shows all of them.
Palettes and textures are shared between classes: colour alone never tells the class, the
shape (with its texture) does. Scenes add textured backgrounds, background clutter, occlusion,
pixel noise and blur. The output uses the VOC layout that ``data.layout=voc`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from protoseg.data.palette import save_mask_png
from protoseg.data.splits import DataError, make_split, refuse_existing, write_split
from protoseg.files import atomic_write

SYNTHETIC_CLASSES: list[str] = ["background", "disc", "bar", "ring", "cross", "triangle"]

# (primary, secondary) colour pairs; each is used by two or more classes.
PALETTES: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = [
    ((205, 45, 40), (245, 215, 70)),  # red / yellow
    ((40, 80, 195), (225, 230, 240)),  # blue / white
    ((45, 150, 65), (25, 35, 30)),  # green / near-black
    ((125, 50, 165), (240, 150, 40)),  # purple / orange
    ((30, 195, 205), (215, 55, 175)),  # cyan / magenta
]


@dataclass(frozen=True)
class Mode:
    """One visual mode of a class: palette index, texture and shape variant."""

    palette: int
    texture: str
    shape: str


# MODES[class_id][mode_id]; mode 0 is the common one (see MODE_PROBS). Each palette+texture
# look but one is worn by two classes (disc and cross share their common look, as do bar and
# triangle), and the three modes of a class never share a palette.
MODES: dict[int, tuple[Mode, Mode, Mode]] = {
    1: (Mode(0, "solid", "circle"), Mode(1, "stripes", "ellipse"), Mode(3, "dots", "blob")),
    2: (Mode(1, "solid", "long"), Mode(2, "checker", "wide"), Mode(3, "dots", "tapered")),
    3: (Mode(2, "stripes", "thick"), Mode(0, "checker", "thin"), Mode(4, "gradient", "oval")),
    4: (Mode(0, "solid", "plus"), Mode(2, "checker", "latin"), Mode(4, "gradient", "chunky")),
    5: (Mode(1, "solid", "equilateral"), Mode(0, "checker", "right"), Mode(2, "stripes", "tall")),
}
MODE_PROBS: tuple[float, float, float] = (0.6, 0.3, 0.1)
_SIZE_JITTER = 16
# 256 train images, labelled at 1/16 and 1/4. With 480 images, 30 labels (1/16) came within
# 2-6 mIoU of the fully labelled ceiling in supervised-only runs; 16 labels leave a clear gap.
DEFAULT_NUM_TRAIN = 256
DEFAULT_LABEL_COUNTS: tuple[int, ...] = (16, 64)
DEFAULT_NUM_VAL = 96
DEFAULT_IMAGE_SIZE = 96
# Bumped whenever the same arguments would render different images or splits.
GENERATOR_VERSION = 2
STAMP_FILE = "synthetic.json"


@dataclass(frozen=True)
class SceneObject:
    """An object placed in a scene: its class id and mode id."""

    class_id: int
    mode: int


@dataclass
class Scene:
    """A rendered scene: RGB image, class mask, instance map (k + 1 = objects[k]), objects."""

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    objects: list[SceneObject]


def ellipse_points(a: float, b: float, n: int = 36) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _shape_parts(shape: str, r: float, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons in object coordinates with the value to paint (255 solid, 0 hole), in order."""
    if shape == "circle":
        return [(ellipse_points(r, r), 255)]
    if shape == "ellipse":
        return [(ellipse_points(r * 1.15, r * rng.uniform(0.5, 0.65)), 255)]
    if shape == "blob":
        t = np.linspace(0.0, 2.0 * math.pi, 11, endpoint=False)
        radius = r * rng.uniform(0.75, 1.1, size=t.size)
        return [(np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1), 255)]
    if shape == "long":
        return [(_rect(-1.3 * r, -0.25 * r, 1.3 * r, 0.25 * r), 255)]
    if shape == "wide":
        return [(_rect(-0.95 * r, -0.45 * r, 0.95 * r, 0.45 * r), 255)]
    if shape == "tapered":
        pts = [[-1.2 * r, -0.4 * r], [1.2 * r, -0.14 * r], [1.2 * r, 0.14 * r], [-1.2 * r, 0.4 * r]]
        return [(np.array(pts), 255)]
    if shape in ("thick", "thin", "oval"):
        aspect = rng.uniform(0.55, 0.7) if shape == "oval" else 1.0
        hole = {"thick": 0.45, "thin": 0.72, "oval": 0.55}[shape]
        return [
            (ellipse_points(r, r * aspect), 255),
            (ellipse_points(r * hole, r * hole * aspect), 0),
        ]
    if shape in ("plus", "chunky"):
        arm, half = (1.0, 0.22) if shape == "plus" else (0.8, 0.34)
        return [
            (_rect(-arm * r, -half * r, arm * r, half * r), 255),
            (_rect(-half * r, -arm * r, half * r, arm * r), 255),
        ]
    if shape == "latin":
        return [
            (_rect(-0.15 * r, -1.15 * r, 0.15 * r, 1.0 * r), 255),
            (_rect(-0.65 * r, -0.55 * r, 0.65 * r, -0.25 * r), 255),
        ]
    if shape == "equilateral":
        t = np.array([-0.5, 1.0 / 6.0, 5.0 / 6.0]) * math.pi
        return [(np.stack([r * 1.15 * np.cos(t), r * 1.15 * np.sin(t)], axis=1), 255)]
    if shape == "right":
        return [(np.array([[-r, -0.9 * r], [r, 0.9 * r], [-r, 0.9 * r]]), 255)]
    if shape == "tall":
        return [(np.array([[0.0, -1.3 * r], [0.45 * r, 0.85 * r], [-0.45 * r, 0.85 * r]]), 255)]
    raise ValueError(f"unknown synthetic shape {shape!r}")


def _place(points: np.ndarray, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    x = cx + points[:, 0] * c - points[:, 1] * s
    y = cy + points[:, 0] * s + points[:, 1] * c
    return list(zip(x.tolist(), y.tolist()))


def _texture(
    kind: str,
    yy: np.ndarray,
    xx: np.ndarray,
    primary: np.ndarray,
    secondary: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """(h, w, 3) float colours of a texture over pixel coordinates yy, xx."""
    angle = rng.uniform(0.0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "solid":
        # A mild lighting ramp so that solid objects are not perfectly flat.
        span = max(float(u.max() - u.min()), 1.0)
        weight = 0.9 + 0.2 * (u - u.min()) / span
        return primary * weight[..., None]
    if kind == "stripes":
        period = rng.uniform(4.0, 7.0)
        weight = ((u + rng.uniform(0, period)) % period) < period / 2
    elif kind == "checker":
        cell = rng.uniform(3.0, 5.5)
        weight = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    elif kind == "dots":
        step = rng.uniform(5.0, 7.5)
        du = (u % step) - step / 2
        dv = (v % step) - step / 2
        weight = du * du + dv * dv < (0.3 * step) ** 2
    elif kind == "gradient":
        weight = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    # The kinds below are the pretraining set's (synthetic_pretrain.py); no segmentation
    # class wears them.
    elif kind == "waves":
        period = rng.uniform(5.0, 8.0)
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + 2.0 * np.sin(v / period))
    elif kind == "grid":
        cell = rng.uniform(4.0, 6.5)
        weight = ((u % cell) < 1.3) | ((v % cell) < 1.3)
    elif kind == "rings":
        period = rng.uniform(4.0, 6.5)
        radius = np.hypot(xx - xx.mean(), yy - yy.mean())
        weight = (radius % period) < period / 2
    elif kind == "speckle":
        weight = rng.random(u.shape) < 0.4
    else:
        raise ValueError(f"unknown synthetic texture {kind!r}")
    weight = weight.astype(np.float32)[..., None]
    return primary * (1.0 - weight) + secondary * weight


def _jitter(color: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.normal(0.0, 10.0, size=3), 0, 255)


def draw_background(
    height: int,
    width: int,
    rng: np.random.Generator,
    palettes: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]] = PALETTES,
    textures: Sequence[str] = ("stripes", "checker", "dots"),
) -> np.ndarray:
    """A muted two-colour gradient with low-frequency blotches and a faint texture."""
    grey = np.float32(128.0)
    a = grey + (rng.uniform(20, 235, size=3).astype(np.float32) - grey) * 0.6
    b = grey + (rng.uniform(20, 235, size=3).astype(np.float32) - grey) * 0.6
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    image = a * (1.0 - ramp[..., None]) + b * ramp[..., None]
    coarse = rng.normal(0.0, 18.0, size=(4, 4, 3)).astype(np.float32)
    blotches = [
        np.asarray(
            Image.fromarray(coarse[..., c]).resize((width, height), Image.Resampling.BILINEAR)
        )
        for c in range(3)
    ]
    image += np.stack(blotches, axis=-1)
    if rng.random() < 0.5:
        # Object textures also appear faintly in the background, so texture alone is no cue.
        kind = textures[int(rng.integers(len(textures)))]
        pair = palettes[int(rng.integers(len(palettes)))]
        primary, secondary = (np.asarray(c, np.float32) for c in pair)
        faint = _texture(kind, yy, xx, primary, secondary, rng)
        image = image * 0.8 + faint * 0.2
    return image


def draw_clutter(
    draw: ImageDraw.ImageDraw,
    height: int,
    width: int,
    rng: np.random.Generator,
    palettes: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]] = PALETTES,
) -> None:
    """Distractor lines, specks and small squares in object colours, labelled background."""
    colors = [c for pair in palettes for c in pair] + [(128, 128, 128)]
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(v) for v in colors[rng.integers(len(colors))])
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        kind = rng.integers(3)
        if kind == 0:
            points = [(x, y)] + [
                (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
                for _ in range(int(rng.integers(1, 3)))
            ]
            draw.line(points, fill=color, width=int(rng.integers(1, 3)))
        elif kind == 1:
            size = float(rng.uniform(1.0, 2.5))
            draw.ellipse([x - size, y - size, x + size, y + size], fill=color)
        else:
            size = float(rng.uniform(1.5, 3.5))
            draw.rectangle([x - size, y - size, x + size, y + size], fill=color)


def render_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """Draw one scene of 1-4 objects over a cluttered textured background."""
    base = draw_background(height, width, rng)
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw_clutter(ImageDraw.Draw(canvas), height, width, rng)
    image = np.asarray(canvas).astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    instances = np.zeros((height, width), np.uint8)
    objects: list[SceneObject] = []
    side = min(height, width)
    for k in range(int(rng.integers(1, 5))):
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mode_id = int(rng.choice(3, p=MODE_PROBS))
        mode = MODES[class_id][mode_id]
        radius = side * rng.uniform(0.13, 0.24)
        cx = rng.uniform(0.12, 0.88) * width
        cy = rng.uniform(0.12, 0.88) * height
        angle = rng.uniform(0.0, 2.0 * math.pi)
        parts = _shape_parts(mode.shape, radius, rng)
        inside = paint_object(
            image, parts, (cx, cy, angle), PALETTES[mode.palette], mode.texture, rng
        )
        if inside is None:
            continue
        mask[inside] = class_id
        instances[inside] = k + 1
        objects.append(SceneObject(class_id, mode_id))
    return Scene(finish_image(image, rng), mask, instances, objects)


def paint_object(
    image: np.ndarray,
    parts: list[tuple[np.ndarray, int]],
    pose: tuple[float, float, float],
    palette: tuple[tuple[int, int, int], tuple[int, int, int]],
    texture: str,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """Paint one textured object into ``image`` in place; return its pixels (None if none).

    ``parts`` are polygons in object coordinates (255 paints, 0 cuts a hole), ``pose`` the
    centre and angle. Later objects overwrite earlier ones: the visible object owns the pixels.
    """
    height, width = image.shape[:2]
    cx, cy, angle = pose
    stencil = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(stencil)
    for points, value in parts:
        draw.polygon(_place(points, cx, cy, angle), fill=value)
    inside = np.asarray(stencil) > 0
    if not inside.any():
        return None
    rows, cols = np.nonzero(inside)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    primary, secondary = (_jitter(c, rng) for c in palette)
    colors = _texture(texture, yy, xx, primary, secondary, rng)
    box = inside[top:bottom, left:right]
    image[top:bottom, left:right][box] = colors[box]
    return inside


def finish_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise and, for half the images, a slight blur; uint8 (h, w, 3)."""
    image = image + rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape).astype(np.float32)
    out = Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))
    return np.asarray(out)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image, so every image is fixed by (seed, split, index) alone."""
    return np.random.default_rng([seed, 1 if split == "val" else 0, index])


def scene_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(height, width), each image_size +- 16 independently."""
    h, w = rng.integers(-_SIZE_JITTER, _SIZE_JITTER + 1, size=2)
    return image_size + int(h), image_size + int(w)


def scene_objects(seed: int, split: str, index: int, image_size: int) -> list[SceneObject]:
    """The objects (class and mode) of one generated image, rendered again from its seed.

    Tells which appearance modes a labelled split shows (``benchmarks/label_coverage.py``).
    """
    rng = scene_rng(seed, split, index)
    height, width = scene_size(rng, image_size)
    return render_scene(rng, height, width).objects


def _write_one(job: tuple[Path, int, str, int, int]) -> None:
    out, seed, split, index, image_size = job
    rng = scene_rng(seed, split, index)
    height, width = scene_size(rng, image_size)
    scene = render_scene(rng, height, width)
    name = f"{split}_{index:05d}"
    image = Image.fromarray(scene.image)
    # Through temporary files: a full disk leaves no truncated image behind.
    atomic_write(
        out / "JPEGImages" / f"{name}.jpg",
        lambda handle: image.save(handle, "JPEG", quality=95),
        durable=False,
    )
    atomic_write(
        out / "SegmentationClass" / f"{name}.png",
        lambda handle: save_mask_png(scene.mask, handle),
        durable=False,
    )


def generate_synthetic(
    out: str | Path,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    label_counts: Sequence[int] = DEFAULT_LABEL_COUNTS,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset in the VOC layout under ``out`` and return that folder.

    Split files, ``classes.txt`` and the stamp already in ``out`` are replaced only with
    ``overwrite`` (the CLI's ``--force``); the check runs before any image is drawn.
    """
    if num_train < 1 or num_val < 1:
        raise DataError(f"num_train={num_train} and num_val={num_val} must both be >= 1")
    if image_size < 2 * _SIZE_JITTER:
        raise DataError(f"image_size={image_size} must be >= {2 * _SIZE_JITTER}")
    for count in label_counts:
        if not 1 <= count <= num_train:
            raise DataError(f"label count {count} must lie in [1, num_train={num_train}]")
    out = Path(out)
    split_files = [out / "splits" / "val.txt"]
    for folder in [*map(str, label_counts), "full"]:
        split_files += [out / "splits" / folder / "labeled.txt"]
        split_files += [out / "splits" / folder / "unlabeled.txt"]
    if not overwrite:
        refuse_existing([*split_files, out / "classes.txt", out / STAMP_FILE])
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, "train", i, image_size) for i in range(num_train)]
    jobs += [(out, seed, "val", i, image_size) for i in range(num_val)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_one(job)
    train = [f"train_{i:05d}" for i in range(num_train)]
    # Existing files were refused above unless overwrite was asked for.
    write_split(out / "splits" / "val.txt", [f"val_{i:05d}" for i in range(num_val)], True)
    for count in label_counts:
        labeled, unlabeled = make_split(train, count, seed)
        write_split(out / "splits" / str(count) / "labeled.txt", labeled, True)
        # With every image labelled, the unlabelled list repeats them, as splits/full does.
        write_split(out / "splits" / str(count) / "unlabeled.txt", unlabeled or train, True)
    write_split(out / "splits" / "full" / "labeled.txt", train, True)
    write_split(out / "splits" / "full" / "unlabeled.txt", train, True)
    write_split(out / "classes.txt", SYNTHETIC_CLASSES, True)
    stamp = json.dumps(
        synthetic_stamp(num_train, num_val, image_size, label_counts, seed), indent=2
    )
    atomic_write(out / STAMP_FILE, lambda handle: handle.write(stamp.encode("utf-8")))
    return out


def synthetic_stamp(
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    label_counts: Sequence[int] = DEFAULT_LABEL_COUNTS,
    seed: int = 0,
) -> dict:
    """What ``generate_synthetic`` records in ``synthetic.json``: its version and arguments."""
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "label_counts": list(label_counts),
        "seed": seed,
    }
