"""The synthetic dataset: layout, determinism, valid labels, and real intra-class modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoseg.data import SYNTHETIC_CLASSES, DataError, generate_synthetic, read_split
from protoseg.data.synthetic import MODE_PROBS, MODES, render_scene, scene_rng, scene_size


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    kw = dict(num_train=10, num_val=4, image_size=48, label_counts=(3, 10))
    first = _files(generate_synthetic(tmp_path / "a", seed=1, **kw))
    assert first == _files(generate_synthetic(tmp_path / "b", seed=1, workers=2, **kw))
    other = _files(generate_synthetic(tmp_path / "c", seed=2, **kw))
    assert other.keys() == first.keys()
    assert other["JPEGImages/train_00000.jpg"] != first["JPEGImages/train_00000.jpg"]
    assert read_split(tmp_path / "a" / "splits" / "10" / "unlabeled.txt") == [
        f"train_{i:05d}" for i in range(10)
    ]


def test_layout_and_splits(synthetic_root: Path) -> None:
    train = [f"train_{i:05d}" for i in range(48)]
    val = [f"val_{i:05d}" for i in range(12)]
    for name in train + val:
        assert (synthetic_root / "JPEGImages" / f"{name}.jpg").is_file()
        assert (synthetic_root / "SegmentationClass" / f"{name}.png").is_file()
    splits = synthetic_root / "splits"
    assert read_split(splits / "val.txt") == val
    labeled = read_split(splits / "8" / "labeled.txt")
    unlabeled = read_split(splits / "8" / "unlabeled.txt")
    assert len(labeled) == 8 and not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == train
    assert read_split(splits / "full" / "labeled.txt") == train
    assert read_split(splits / "full" / "unlabeled.txt") == train
    assert read_split(synthetic_root / "classes.txt") == SYNTHETIC_CLASSES
    assert len(SYNTHETIC_CLASSES) == 6 and SYNTHETIC_CLASSES[0] == "background"


def test_masks_are_valid_and_sizes_vary(synthetic_root: Path) -> None:
    present: set[int] = set()
    sizes: set[tuple[int, int]] = set()
    for mask_path in sorted((synthetic_root / "SegmentationClass").glob("*.png")):
        mask_image = Image.open(mask_path)
        assert mask_image.mode == "P"
        mask = np.array(mask_image)
        image = Image.open(synthetic_root / "JPEGImages" / f"{mask_path.stem}.jpg")
        assert image.mode == "RGB" and image.size == mask_image.size
        assert set(np.unique(mask).tolist()) <= set(range(len(SYNTHETIC_CLASSES)))
        present |= set(np.unique(mask).tolist())
        sizes.add(mask.shape)
    assert present == set(range(len(SYNTHETIC_CLASSES)))
    heights, widths = {h for h, _ in sizes}, {w for _, w in sizes}
    assert len(heights) > 5 and len(widths) > 5
    assert min(heights | widths) >= 64 - 16 and max(heights | widths) <= 64 + 16
    assert any(h != w for h, w in sizes) and any(h % 2 for h, _ in sizes)


def test_mode_table_shares_looks_between_classes() -> None:
    assert sorted(MODES) == list(range(1, len(SYNTHETIC_CLASSES)))
    classes_per_palette: dict[int, set[int]] = {}
    classes_per_texture: dict[str, set[int]] = {}
    for class_id, modes in MODES.items():
        assert len(modes) >= 3
        assert len({m.palette for m in modes}) == len(modes), "a class's modes differ in colour"
        assert len({m.shape for m in modes}) == len(modes)
        for mode in modes:
            classes_per_palette.setdefault(mode.palette, set()).add(class_id)
            classes_per_texture.setdefault(mode.texture, set()).add(class_id)
    assert all(len(c) >= 2 for c in classes_per_palette.values())
    assert all(len(c) >= 2 for c in classes_per_texture.values())
    assert MODE_PROBS[0] > MODE_PROBS[1] > MODE_PROBS[2] > 0 and abs(sum(MODE_PROBS) - 1) < 1e-9


def _instances(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per visible object: colour features (mean, std of RGB), class id and mode id."""
    features, classes, modes = [], [], []
    for index in range(count):
        rng = scene_rng(7, "train", index)
        scene = render_scene(rng, *scene_size(rng, 64))
        assert 1 <= len(scene.objects) <= 4
        for k, obj in enumerate(scene.objects):
            owned = scene.instances == k + 1
            # Occlusion: every owned pixel carries the object's class in the mask.
            assert (scene.mask[owned] == obj.class_id).all()
            if owned.sum() < 40:
                continue
            pixels = scene.image[owned].astype(np.float32)
            features.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
            classes.append(obj.class_id)
            modes.append(obj.mode)
    return np.array(features), np.array(classes), np.array(modes)


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Fit class centroids on even rows, score on odd rows."""
    fit = np.arange(len(x)) % 2 == 0
    labels = np.unique(y[fit])
    centroids = np.stack([x[fit & (y == label)].mean(0) for label in labels])
    distances = ((x[~fit][:, None] - centroids[None]) ** 2).sum(-1)
    return float((labels[distances.argmin(1)] == y[~fit]).mean())


def _knn_accuracy(x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    fit = np.arange(len(x)) % 2 == 0
    distances = ((x[~fit][:, None] - x[fit][None]) ** 2).sum(-1)
    votes = y[fit][np.argsort(distances, axis=1)[:, :k]]
    predicted = np.array([np.bincount(v).argmax() for v in votes])
    return float((predicted == y[~fit]).mean())


def test_every_class_has_three_distinct_skewed_modes() -> None:
    features, classes, modes = _instances(200)
    counts = np.bincount(modes, minlength=3)
    assert counts[0] > counts[1] > counts[2] >= 0.04 * counts.sum(), counts
    for class_id in range(1, len(SYNTHETIC_CLASSES)):
        mine = classes == class_id
        per_mode = np.bincount(modes[mine], minlength=3)
        assert (per_mode >= 3).all(), (class_id, per_mode)
        # Modes must look different: colour statistics alone tell them apart.
        accuracy = _nearest_centroid_accuracy(features[mine], modes[mine])
        assert accuracy >= 0.9, (class_id, accuracy)
    # ...while colour alone does not tell the class (shared palettes and textures).
    assert _knn_accuracy(features, classes) <= 0.7


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="label count 50"):
        generate_synthetic(tmp_path, num_train=10, num_val=2, label_counts=(50,))
    with pytest.raises(DataError, match="image_size"):
        generate_synthetic(tmp_path, num_train=10, num_val=2, image_size=8, label_counts=(2,))


def test_existing_splits_are_kept_unless_overwrite(tmp_path: Path) -> None:
    kw = dict(num_train=6, num_val=2, image_size=32, label_counts=(2,))
    root = generate_synthetic(tmp_path / "d", **kw)
    classes = root / "classes.txt"
    classes.write_text("my\nown\nnames\n")
    with pytest.raises(DataError) as info:
        generate_synthetic(root, seed=5, **kw)
    assert str(info.value).startswith(f"{root / 'splits' / 'val.txt'}: already exists (and ")
    assert "pass --force" in str(info.value)
    assert classes.read_text() == "my\nown\nnames\n"
    generate_synthetic(root, seed=5, overwrite=True, **kw)
    assert read_split(classes) == SYNTHETIC_CLASSES


def test_scene_objects_name_the_classes_of_the_written_masks(synthetic_root: Path) -> None:
    from protoseg.data.synthetic import scene_objects

    modes = set()
    for index in range(12):
        objects = scene_objects(0, "train", index, 64)
        mask = np.array(Image.open(synthetic_root / "SegmentationClass" / f"train_{index:05d}.png"))
        # Every labelled class of the mask is an object's (a later object may hide an
        # earlier one entirely, so not the other way round).
        assert set(np.unique(mask).tolist()) - {0} <= {o.class_id for o in objects}
        modes |= {o.mode for o in objects}
    assert modes <= {0, 1, 2} and len(modes) > 1
    other_draw = [scene_objects(1, "train", i, 64) for i in range(12)]
    assert other_draw != [scene_objects(0, "train", i, 64) for i in range(12)]
