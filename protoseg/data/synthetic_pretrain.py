"""The synthetic benchmark's stand-in for ImageNet: a multi-label classification set.

Real semi-supervised segmentation starts from an encoder pretrained on a large labelled
classification set, whose features already tell apart appearances the few labelled masks
never show. This set plays that role for the synthetic benchmark, without leaking the target
task: each image holds one object of one of *other* shapes (stars, hexagons, crescents, ...), in
*other* textures (waves, grids, rings, speckle) and *other* colour pairs than the
segmentation classes, over backgrounds and clutter drawn in its own colours. Each image is
labelled with its object's shape.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from protoseg.data.synthetic import (
    draw_background,
    draw_clutter,
    ellipse_points,
    finish_image,
    paint_object,
)

# Bumped whenever the same arguments would render other images or labels.
PRETRAIN_SET_VERSION = 1

PRETRAIN_SHAPES: tuple[str, ...] = (
    "star",
    "hexagon",
    "crescent",
    "arrow",
    "semicircle",
    "ell",
    "tee",
    "chevron",
    "hourglass",
    "kite",
)
PRETRAIN_TEXTURES: tuple[str, ...] = ("waves", "grid", "rings", "speckle")
# Colour pairs none of which the segmentation set's palettes use.
PRETRAIN_PALETTES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((140, 90, 50), (40, 140, 130)),  # brown / teal
    ((235, 150, 170), (120, 130, 40)),  # pink / olive
    ((25, 35, 95), (170, 230, 60)),  # navy / lime
    ((120, 25, 45), (135, 200, 235)),  # maroon / sky
    ((105, 105, 115), (220, 180, 30)),  # slate / gold
    ((250, 120, 90), (60, 60, 160)),  # salmon / indigo
)
# The classes are the shapes: each wears every texture and colour pair at random, so the
# classifier must learn shape over colour and texture, the cue that the segmentation set's
# classes keep across their modes.
PRETRAIN_LABELS: tuple[str, ...] = PRETRAIN_SHAPES


def _polygon(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def pretrain_shape_parts(shape: str, r: float) -> list[tuple[np.ndarray, int]]:
    """Polygons of a pretraining shape in object coordinates, with the value to paint."""
    if shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1), 255)]
    if shape == "hexagon":
        t = np.arange(6) * math.pi / 3
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 255)]
    if shape == "crescent":
        bite = ellipse_points(0.85 * r, 0.85 * r) + np.array([0.5 * r, 0.0])
        return [(ellipse_points(r, r), 255), (bite, 0)]
    if shape == "arrow":
        return [
            (
                _polygon(
                    (-r, -0.2 * r),
                    (0.2 * r, -0.2 * r),
                    (0.2 * r, -0.6 * r),
                    (r, 0.0),
                    (0.2 * r, 0.6 * r),
                    (0.2 * r, 0.2 * r),
                    (-r, 0.2 * r),
                ),
                255,
            )
        ]
    if shape == "semicircle":
        t = np.linspace(0.0, math.pi, 19)
        return [(np.stack([r * np.cos(t), r * np.sin(t) - 0.4 * r], axis=1), 255)]
    if shape == "ell":
        return [
            (
                _polygon(
                    (-0.8 * r, -r),
                    (-0.3 * r, -r),
                    (-0.3 * r, 0.5 * r),
                    (0.8 * r, 0.5 * r),
                    (0.8 * r, r),
                    (-0.8 * r, r),
                ),
                255,
            )
        ]
    if shape == "tee":
        return [
            (
                _polygon(
                    (-r, -r),
                    (r, -r),
                    (r, -0.55 * r),
                    (0.22 * r, -0.55 * r),
                    (0.22 * r, r),
                    (-0.22 * r, r),
                    (-0.22 * r, -0.55 * r),
                    (-r, -0.55 * r),
                ),
                255,
            )
        ]
    if shape == "chevron":
        return [
            (
                _polygon(
                    (-r, -0.6 * r),
                    (0.0, 0.3 * r),
                    (r, -0.6 * r),
                    (r, 0.0),
                    (0.0, 0.9 * r),
                    (-r, 0.0),
                ),
                255,
            )
        ]
    if shape == "hourglass":
        return [
            (
                _polygon(
                    (-0.7 * r, -r),
                    (0.7 * r, -r),
                    (0.12 * r, 0.0),
                    (0.7 * r, r),
                    (-0.7 * r, r),
                    (-0.12 * r, 0.0),
                ),
                255,
            )
        ]
    if shape == "kite":
        return [(_polygon((0.0, -r), (0.55 * r, -0.25 * r), (0.0, r), (-0.55 * r, -0.25 * r)), 255)]
    raise ValueError(f"unknown pretraining shape {shape!r}")


def render_pretrain_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """One (size, size, 3) uint8 image of one object, and the index of its shape.

    One object an image, as ImageNet has one labelled object an image: a softmax over the
    shapes learns shape features far faster on a CPU than a multi-label set of crowded scenes.
    """
    image = draw_background(size, size, rng, PRETRAIN_PALETTES, PRETRAIN_TEXTURES)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw_clutter(ImageDraw.Draw(canvas), size, size, rng, PRETRAIN_PALETTES)
    image = np.asarray(canvas).astype(np.float32)
    shape = int(rng.integers(len(PRETRAIN_SHAPES)))
    texture = PRETRAIN_TEXTURES[int(rng.integers(len(PRETRAIN_TEXTURES)))]
    palette = PRETRAIN_PALETTES[int(rng.integers(len(PRETRAIN_PALETTES)))]
    radius = size * rng.uniform(0.28, 0.42)
    pose = (
        float(rng.uniform(0.4, 0.6) * size),
        float(rng.uniform(0.4, 0.6) * size),
        float(rng.uniform(0.0, 2.0 * math.pi)),
    )
    paint_object(
        image, pretrain_shape_parts(PRETRAIN_SHAPES[shape], radius), pose, palette, texture, rng
    )
    return finish_image(image, rng), shape


def pretrain_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of one pretraining image (a stream apart from the segmentation set's)."""
    return np.random.default_rng([seed, 7, index])


def _render_range(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, start, stop, size = job
    pairs = [render_pretrain_image(pretrain_rng(seed, i), size) for i in range(start, stop)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int64)


def render_pretrain_set(
    num_images: int, size: int, seed: int, workers: int = 1, first: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``first .. first + num_images - 1`` as (N, size, size, 3) uint8, and (N,) labels.

    Every image is fixed by (seed, index) alone, so the result does not depend on ``workers``.
    """
    if num_images < 1 or size < 16:
        raise ValueError(f"num_images={num_images} must be >= 1 and size={size} >= 16")
    chunk = 256
    jobs = [
        (seed, start, min(start + chunk, first + num_images), size)
        for start in range(first, first + num_images, chunk)
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_range, jobs))
    else:
        parts = [_render_range(job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
