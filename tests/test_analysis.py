"""Inference, export and analysis commands on a tiny real checkpoint (3 training steps)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from protoseg.analysis.discrimination import _sample_map, scatter_traces, select_pixels
from protoseg.analysis.export import export_onnx, sidecar_path
from protoseg.analysis.infer import overlay, predict_paths
from protoseg.analysis.legend import legend_entries
from protoseg.analysis.qualitative import grid_figure, load_val_examples, prediction_grid, pyplot
from protoseg.analysis.report import (
    WARMUP_LABEL,
    curve_data,
    curves_figure,
    miou_bar_chart,
    miou_figure,
    miou_title,
    read_curves,
    training_curves,
    write_demo_report,
)
from protoseg.cli import main
from protoseg.cli.sweep import collect, plan_sweep, split_values
from protoseg.config import ConfigError, load_config
from protoseg.data import build_dataset, eval_transform, generate_synthetic
from protoseg.files import CheckpointError
from protoseg.inference import Predictor, load

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_CLASSES = 6


def _train_overrides(root: Path, out: Path, iterations: int = 3, method: str = "pcr") -> list[str]:
    return [
        f"data.root={root}",
        "data.labeled_split=splits/6/labeled.txt",
        "data.unlabeled_split=splits/6/unlabeled.txt",
        f"train.out_dir={out}",
        f"train.iterations={iterations}",
        *(["method.warmup_epochs=0"] if method != "supervised" else []),
        "data.crop_size=48",
        "train.batch_size=2",
        "train.progress=false",
        "train.checkpoint_every=0",
    ]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6-image validation set and a PCR model trained for 3 steps on it."""
    from protoseg.engine.trainer import Trainer

    base = tmp_path_factory.mktemp("analysis")
    root = generate_synthetic(
        base / "data", num_train=24, num_val=6, image_size=48, label_counts=(6,), seed=0
    )
    out = base / "run"
    Trainer(load_config("synthetic/pcr.yaml", _train_overrides(root, out))).fit()
    return {"root": root, "run": out, "model": out / "model.pt", "base": base}


@pytest.fixture(scope="session")
def predictor(tiny: dict[str, Path]) -> Predictor:
    return load(tiny["model"])


def _cfg_args(tiny: dict[str, Path]) -> list[str]:
    return ["--config", "synthetic/pcr.yaml", f"data.root={tiny['root']}"]


# ---- predict ---------------------------------------------------------------------------------
def test_predict_any_mode_and_size(predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    images = [
        Image.fromarray(rgb[..., 0], mode="L"),
        Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="RGBA"),
        Image.fromarray(rgb).convert("P"),
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),  # 16-bit greyscale
        rgb[:17, :23],  # a numpy array
    ]
    for image in images:
        mask = predictor.predict(image)
        h, w = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
        assert mask.shape == (h, w) and mask.dtype == np.uint8
        assert mask.min() >= 0 and mask.max() < NUM_CLASSES


def test_prototype_head_predicts(tiny: dict[str, Path]) -> None:
    proto = load(tiny["model"], head="prototype")
    mask = proto.predict(Image.new("RGB", (27, 19), (120, 60, 30)))
    assert mask.shape == (19, 27) and mask.max() < NUM_CLASSES
    with pytest.raises(ValueError, match="has no 'knn' head"):
        load(tiny["model"], head="knn")


def test_predict_folder_writes_masks_and_overlays(predictor: Predictor, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    pixels = rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.jpg")
    Image.fromarray(pixels[::-1]).save(folder / "same.size.png")
    Image.fromarray(pixels[:29, :41, 0], mode="L").save(folder / "grey.png")
    Image.fromarray(np.dstack([pixels[:23, :19], pixels[:23, :19, :1]])).save(folder / "a.png")
    Image.fromarray(pixels[:20, :20]).save(folder / "sub" / "deep.bmp")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    summary = predict_paths(predictor, [folder], out, batch_size=2, progress=False)

    expected = {"photo": (51, 37), "same.size": (51, 37), "grey": (41, 29), "a": (19, 23)}
    assert sorted(p.name for p in summary.masks) == sorted(f"{n}.png" for n in expected)
    assert [p.name for p, _ in summary.failed] == ["broken.jpg"]
    for name, size in expected.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() < NUM_CLASSES
        # Image | overlay on top, the legend strip below (wider than a tiny pair if need be).
        width, height = Image.open(out / "overlay" / f"{name}.jpg").size
        assert width >= 2 * size[0] and height > size[1]
    # The batched result equals the one-image API on the same file.
    single = predictor.predict(Image.open(folder / "photo.jpg"))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo.png")), single)

    again = predict_paths(predictor, [folder], tmp_path / "r", recursive=True, progress=False)
    assert (tmp_path / "r" / "sub" / "deep.png").is_file() and len(again.masks) == 5


def test_predict_cli_and_errors(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((21, 34, 3), 90, dtype=np.uint8)).save(folder / "x.jpg")
    args = ["predict", str(folder), "--checkpoint", str(tiny["model"]), "--out"]
    assert main([*args, str(tmp_path / "o"), "--flip", "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "o" / "x.png").size == (34, 21)

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    unused = str(tmp_path / "unused")
    assert main(["predict", str(empty), "--checkpoint", str(tiny["model"]), "--out", unused]) == 2
    assert str(empty) in capsys.readouterr().err

    missing = tmp_path / "nope" / "model.pt"
    assert main(["predict", str(folder), "--checkpoint", str(missing), "--out", unused]) == 2
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=str(missing)):
        load(missing)
    assert not Path(unused).exists()


# ---- export ----------------------------------------------------------------------------------
SIZES = [(1, 40, 56), (2, 67, 33)]


def _reference(predictor: Predictor, batch: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return predictor.model(batch)["logits"].numpy()


def test_export_onnx_matches_pytorch(predictor: Predictor, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(predictor, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, h, w in SIZES:
        batch = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h))
        (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        assert got.shape == (b, NUM_CLASSES, h, w)
        np.testing.assert_allclose(got, _reference(predictor, batch), atol=1e-3)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["class_names"] == predictor.class_names and meta["mean"] == predictor.mean
    assert meta["std"] == predictor.std and len(meta["palette"]) == NUM_CLASSES


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_cli_matches_pytorch(
    tiny: dict[str, Path], predictor: Predictor, tmp_path: Path
) -> None:
    path = tmp_path / "m.pt"
    args = ["export", "--checkpoint", str(tiny["model"]), "--format", "torchscript"]
    assert main([*args, "--out", str(path)]) == 0
    module = torch.jit.load(str(path))
    for b, h, w in SIZES:
        batch = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(w))
        with torch.no_grad():
            got = module(batch).numpy()
        np.testing.assert_allclose(got, _reference(predictor, batch), atol=1e-3)
    assert json.loads(sidecar_path(path).read_text())["model_format"] == "torchscript"


# ---- discrimination --------------------------------------------------------------------------
def test_scatter_traces_planted() -> None:
    a, s, t = 3.0, 0.5, 2.0
    # Class 4: 4 points at x=+a, y=+-s; class 9: 12 points at x=-a, y=+-t (means exact).
    first = [[a, s, 0.0], [a, -s, 0.0]] * 2
    second = [[-a, t, 0.0], [-a, -t, 0.0]] * 6
    features = torch.tensor(first + second)
    labels = torch.tensor([4] * 4 + [9] * 12)
    traces = scatter_traces(features, labels)
    # Weights 1/4 and 3/4; overall mean x = -a/2.
    assert traces["inter"] == pytest.approx(0.25 * (1.5 * a) ** 2 + 0.75 * (0.5 * a) ** 2)
    assert traces["intra"] == pytest.approx(0.25 * s**2 + 0.75 * t**2)
    assert traces["ratio"] == pytest.approx(traces["inter"] / traces["intra"])

    balanced = scatter_traces(
        torch.tensor([[a, s], [a, -s], [-a, s], [-a, -s]]), torch.tensor([0, 0, 1, 1])
    )
    assert balanced == pytest.approx({"inter": a**2, "intra": s**2, "ratio": a**2 / s**2})


def test_scatter_traces_match_explicit_matrices() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (200,), generator=gen)
    x[y == 2] += 3.0
    mu = x.mean(0)
    s_b = torch.zeros(7, 7, dtype=torch.float64)
    s_w = torch.zeros(7, 7, dtype=torch.float64)
    for c in y.unique():
        xc = x[y == c]
        w = len(xc) / len(x)
        d = (xc.mean(0) - mu)[:, None]
        s_b += w * d @ d.T
        s_w += w * torch.cov(xc.T, correction=0)
    traces = scatter_traces(x, y)
    assert traces["inter"] == pytest.approx(float(s_b.trace()))
    assert traces["intra"] == pytest.approx(float(s_w.trace()))
    assert traces["inter"] + traces["intra"] == pytest.approx(float(x.var(0, unbiased=False).sum()))
    with pytest.raises(ValueError, match="expected features"):
        scatter_traces(x, y[:-1])


def test_feature_sampling_equals_upsampled_map() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 5, 7, 9, generator=gen)
    full = F.interpolate(features, size=(27, 35), mode="bilinear", align_corners=True)
    ys, xs = torch.tensor([0, 26, 13, 5]), torch.tensor([0, 34, 17, 30])
    got = _sample_map(features, ys, xs, (27, 35))
    torch.testing.assert_close(got, full[0, :, ys, xs].T, atol=1e-5, rtol=1e-5)


def test_select_pixels_is_uniform_per_class_and_on_labels(tiny: dict[str, Path]) -> None:
    cfg = load_config("synthetic/pcr.yaml", [f"data.root={tiny['root']}"])
    dataset = build_dataset(cfg.data, "val", eval_transform(cfg.data))
    selection = select_pixels(dataset, 40, classes=[0, 2], seed=3)
    assert selection.counts[0] == 40 and 0 < selection.counts[2] <= 40
    for index, (ys, xs, labels) in selection.positions.items():
        mask = dataset.load_mask(index)
        np.testing.assert_array_equal(mask[ys, xs], labels)
    again = select_pixels(dataset, 40, classes=[0, 2], seed=3)
    assert all(
        np.array_equal(a[0], b[0])
        for a, b in zip(selection.positions.values(), again.positions.values())
    )
    with pytest.raises(ValueError, match="outside"):
        select_pixels(dataset, 5, classes=[NUM_CLASSES])


def test_discrimination_cli(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    step = tiny["run"] / "checkpoints" / "step_0000003.pt"
    args = ["analyze", "discrimination", "--checkpoint", str(tiny["model"]), str(step)]
    args += [
        *_cfg_args(tiny),
        "--pixels-per-class",
        "20",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert "tr(intra-class var.)" in capsys.readouterr().out
    with (tmp_path / "discrimination.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["run", "run/step_0000003"]
    assert all(float(r["inter"]) > 0 and float(r["intra"]) > 0 for r in rows)
    assert int(rows[0]["pixels"]) == 20 * NUM_CLASSES
    # model.pt holds the teacher of step 3, the very weights the training checkpoint holds.
    assert rows[0]["ratio"] == rows[1]["ratio"]


# ---- figures ---------------------------------------------------------------------------------
def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200


def test_tsne_cli(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tsne.png"
    args = ["analyze", "tsne", "--checkpoint", str(tiny["model"]), *_cfg_args(tiny)]
    assert main([*args, "--classes", "0,1,2", "--pixels-per-class", "30", "--out", str(out)]) == 0
    _assert_png(out)


def test_qualitative_cli(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config("synthetic/pcr.yaml", [f"data.root={tiny['root']}"])
    names, images, masks = load_val_examples(cfg, count=2, seed=1)
    assert len(names) == 2 and images[0].size == masks[0].shape[::-1]
    # The report's grid takes the split's first images, `analyze qualitative` a seeded draw.
    first, _, _ = load_val_examples(cfg, count=4, seed=None)
    assert first == [f"val_{i:05d}" for i in range(4)]
    assert load_val_examples(cfg, count=4, seed=0)[0] != first
    with pytest.raises(ValueError, match="not in the validation split"):
        load_val_examples(cfg, names=["no_such_image"])
    out = tmp_path / "grid.png"
    args = ["analyze", "qualitative", "--checkpoint", str(tiny["model"]), str(tiny["model"])]
    args += ["--names", "a,b", *_cfg_args(tiny), "--images", ",".join(names), "--out", str(out)]
    assert main(args) == 0
    _assert_png(out)


# ---- report figures and legends (fake histories, masks and predictors: no training) ----------
def _pcr_like_history(warmup_end: int = 30) -> list[dict[str, float]]:
    """Warm-up lines with the supervised terms only, then the unlabelled terms switch on."""
    history: list[dict[str, float]] = []
    for step in range(10, 70, 10):
        entry = {"step": step, "loss_sup": 1.0 / step, "lr": 0.01, "grad_norm": 2.0}
        if step >= warmup_end:
            entry |= {"loss_unsup": 0.2, "loss_proto_sup": 0.5, "confident_fraction": 0.8}
        entry["loss"] = sum(v for k, v in entry.items() if k.startswith("loss_"))
        history.append(entry)
        if step % 20 == 0:
            history.append({"step": step, "val_miou_linear": step / 2, "val_miou_prototype": 1.0})
    return history


def _supervised_history() -> list[dict[str, float]]:
    return [{"step": s, "loss": 1.0 / s, "loss_sup": 1.0 / s, "lr": 0.01} for s in (10, 20, 30)]


def test_curve_data_splits_terms_and_finds_warmup_end() -> None:
    curves = curve_data("pcr", _pcr_like_history(warmup_end=30))
    # The total first, then the terms as they appear; lr, grad_norm, fractions are not terms.
    assert list(curves.losses) == ["loss", "loss_sup", "loss_unsup", "loss_proto_sup"]
    assert curves.losses["loss_sup"][0] == [10, 20, 30, 40, 50, 60]
    assert curves.losses["loss_unsup"] == ([30, 40, 50, 60], [0.2] * 4)
    assert curves.losses["loss"][1][2] == pytest.approx(1 / 30 + 0.7)
    assert curves.val_miou == {
        "linear": ([20, 40, 60], [10.0, 20.0, 30.0]),
        "prototype": ([20, 40, 60], [1.0, 1.0, 1.0]),
    }
    assert curves.warmup_end == 30
    assert curve_data("pcr", _pcr_like_history(warmup_end=50)).warmup_end == 50
    # No warm-up: all terms from the first line on; a supervised run never changes terms.
    assert curve_data("pcr", _pcr_like_history(warmup_end=0)).warmup_end is None
    assert curve_data("supervised", _supervised_history()).warmup_end is None


def _fake_run(folder: Path, name: str, history: list | None, **fields: object) -> SimpleNamespace:
    folder.mkdir(parents=True)
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history))
    defaults: dict[str, object] = {"miou": 40.0, "labeled": 16, "seed": 0}
    return SimpleNamespace(name=name, out_dir=str(folder), **(defaults | fields))


def test_training_curves_one_line_per_term_and_warmup_marker(tmp_path: Path) -> None:
    rows = [
        _fake_run(tmp_path / "sup", "supervised", _supervised_history()),
        _fake_run(tmp_path / "pcr", "pcr", _pcr_like_history(warmup_end=40)),
        _fake_run(tmp_path / "lost", "no_history", None),
    ]
    runs = read_curves(rows)
    assert [r.name for r in runs] == ["supervised", "pcr"]
    fig = curves_figure(runs)
    sup_ax, pcr_ax, val_ax = fig.axes[:3]

    def labels(ax) -> list[str]:
        return [line.get_label() for line in ax.get_lines()]

    assert labels(sup_ax) == ["loss", "loss_sup"]
    assert labels(pcr_ax) == ["loss", "loss_sup", "loss_unsup", "loss_proto_sup", WARMUP_LABEL]
    marker = pcr_ax.get_lines()[-1]
    assert list(marker.get_xdata()) == [40, 40]
    # A term keeps its colour from panel to panel.
    assert sup_ax.get_lines()[1].get_color() == pcr_ax.get_lines()[1].get_color()
    # The supervised run logged no validation; the one warm-up step is marked once.
    assert labels(val_ax)[:2] == ["pcr (linear)", "pcr (prototype)"]
    assert [list(line.get_xdata()) for line in val_ax.get_lines()[2:]] == [[40, 40]]
    assert not any(ax.get_visible() for ax in fig.axes[3:4])  # the unused 4th cell
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0] == "loss (total)" and "loss_proto_sup" in legend
    assert legend[-1].startswith(WARMUP_LABEL)
    pyplot().close(fig)
    _assert_png(training_curves(rows, tmp_path / "curves.png"))


def test_miou_chart_title_names_labels_iterations_seed(tmp_path: Path) -> None:
    rows = [
        _fake_run(tmp_path / "a", "supervised", None, seed=3),
        _fake_run(tmp_path / "b", "pcr", _pcr_like_history(), seed=3, miou=45.0),
    ]
    (tmp_path / "a" / "config.yaml").write_text("train:\n  iterations: 600\n")
    (tmp_path / "b" / "config.yaml").write_text("train:\n  iterations: 600\n")
    fig = miou_figure(rows)
    title = fig.axes[0].get_title()
    pyplot().close(fig)
    assert "16 labelled images" in title and "600 iterations" in title and "seed 3" in title
    _assert_png(miou_bar_chart(rows, tmp_path / "miou.png"))
    # Epoch-based runs (iterations 0) count their last logged step; mixed values are listed.
    (tmp_path / "b" / "config.yaml").write_text("train:\n  iterations: 0\n")
    rows[1].labeled, rows[1].seed = 64, 4
    assert miou_title(rows) == (
        "Final validation mIoU: 16 / 64 labelled images, 600 / 60 iterations, seed 3 / 4"
    )


PALETTE = [(200, 30, 40), (30, 160, 60), (40, 60, 210), (220, 180, 20), (150, 40, 170)]
NAMES = ["background", "disc", "bar", "ring", "cross"]


def test_legend_entries_are_the_classes_present() -> None:
    masks = [np.array([[0, 3], [3, 255]]), np.array([[3, 7]])]
    entries = legend_entries(masks, NAMES, PALETTE, ignore_index=255)
    assert [e.label for e in entries] == ["background", "ring", "class 7", "ignored"]
    assert entries[1].color == PALETTE[3] and entries[2].color == (0, 0, 0)
    assert [e.label for e in legend_entries(masks[1:], NAMES, PALETTE)] == ["ring", "class 7"]


def _strip_colors(image: Image.Image, top: int) -> set[tuple[int, int, int]]:
    pixels = np.asarray(image)[top:].reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


def test_overlay_legend_strip_lists_the_mask_classes() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 80, 3), dtype=np.uint8))
    mask = np.zeros((30, 80), dtype=np.uint8)
    mask[5:15, 10:30], mask[20:, 50:] = 2, 4
    out = overlay(image, mask, PALETTE, class_names=NAMES)
    assert out.width == 160 and out.height > 30
    np.testing.assert_array_equal(np.asarray(out)[:30, :80], np.asarray(image))
    # Swatches carry the exact class colours; text is grey on white, so no other colour
    # of the palette can appear in the strip.
    colors = _strip_colors(out, 30)
    assert {PALETTE[0], PALETTE[2], PALETTE[4]} <= colors
    assert not {PALETTE[1], PALETTE[3]} & colors
    # A pair too narrow for a label widens the canvas instead of cutting the label.
    tiny = overlay(image.crop((0, 0, 6, 6)), mask[:6, :6], PALETTE, class_names=NAMES)
    assert tiny.width > 12 and _strip_colors(tiny, 6) & set(PALETTE) == {PALETTE[0]}


class _FixedPredictor:
    """Stands in for a Predictor: the same mask for every image."""

    class_names = NAMES
    palette = PALETTE

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def predict(self, image: Image.Image, eval_cfg: object = None) -> np.ndarray:
        return self.mask


def test_prediction_grid_has_one_legend_of_the_classes_shown(tmp_path: Path) -> None:
    images = [Image.new("RGB", (8, 6), (90, 90, 90))] * 2
    truths = [np.full((6, 8), 1, np.uint8), np.full((6, 8), 1, np.uint8)]
    truths[1][0, 0] = 255
    predictors = {
        "a": _FixedPredictor(np.full((6, 8), 3, np.uint8)),
        "b": _FixedPredictor(np.full((6, 8), 1, np.uint8)),
    }
    fig = grid_figure(predictors, images, truths, PALETTE, title="first 2")
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["disc", "ring", "ignored"]
    assert fig.get_suptitle() == "first 2"
    pyplot().close(fig)
    without_ignored = grid_figure(predictors, images[:1], truths[:1], PALETTE)
    legend = without_ignored.legends[0].get_texts()
    assert [t.get_text() for t in legend] == ["disc", "ring"]
    pyplot().close(without_ignored)
    _assert_png(prediction_grid(predictors, images, truths, PALETTE, tmp_path / "grid.png"))


def test_demo_report_from_a_run_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config("synthetic/pcr.yaml", [f"data.root={tiny['root']}"])
    row = SimpleNamespace(
        name="pcr",
        labeled=6,
        seed=0,
        miou=12.5,
        best_miou=12.5,
        iou=[12.5] * NUM_CLASSES,
        seconds=1.0,
        out_dir=str(tiny["run"]),
        head="linear",
    )
    report = write_demo_report(tmp_path, [row], [f"c{i}" for i in range(NUM_CLASSES)], cfg, 2)
    text = report.read_text()
    for name in ("miou.png", "curves.png", "predictions.png"):
        assert f"]({name})" in text
        _assert_png(tmp_path / name)
    # The 3-step fixture ran without warm-up (warmup_epochs=0): nothing to mark.
    assert read_curves([row])[0].warmup_end is None
    assert "3 iterations" in miou_title([row]) and "6 labelled images" in miou_title([row])


# ---- sweep -----------------------------------------------------------------------------------
def test_sweep_parsing() -> None:
    assert split_values("0.7,0.9") == ["0.7", "0.9"]
    assert split_values("[0.5,2.0],[1,1]") == ["[0.5,2.0]", "[1,1]"]
    with pytest.raises(ConfigError, match="exactly one"):
        plan_sweep(
            "synthetic/pcr.yaml",
            ["data.root=x", "method.temperature=0.1,0.2", "method.confidence_threshold=0.7,0.9"],
        )
    with pytest.raises(ConfigError, match="exactly one"):
        plan_sweep("synthetic/pcr.yaml", ["data.root=x"])
    with pytest.raises(ConfigError, match="confidence_threshold=1.5"):
        plan_sweep("synthetic/pcr.yaml", ["data.root=x", "method.confidence_threshold=0.5,1.5"])


# The supervised recipe trains fastest; the sweep machinery does not depend on the method.
def test_sweep_runs_and_collects(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    overrides = [
        o for o in _train_overrides(tiny["root"], out, 2, "supervised") if "out_dir" not in o
    ]
    args = [
        "sweep",
        "synthetic/supervised.yaml",
        "optim.lr=0.01,0.02",
        *overrides,
        "--out",
        str(out),
    ]
    assert main([*args, "--print-commands", "--nproc", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    prefix = "torchrun --nproc_per_node=2 -m protoseg.cli train synthetic/supervised.yaml"
    assert len(lines) == 2 and all(line.startswith(prefix) for line in lines)
    assert "optim.lr=0.02" in lines[1] and not out.exists()

    assert main(args) == 0
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["value"] for r in rows] == ["0.01", "0.02"]
    assert all(0 <= float(r["miou_linear"]) <= 100 and r["status"] == "done" for r in rows)
    assert (out / "optim.lr=0.02" / "model.pt").is_file()
    assert (out / "sweep.md").read_text().count("| done |") == 2
    _assert_png(out / "sweep.png")
    # Finished runs are collected again, not retrained.
    model = out / "optim.lr=0.01" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert main(args) == 0 and model.stat().st_mtime_ns == stamp
    plan = plan_sweep("synthetic/supervised.yaml", args[2:-2], out)
    assert len(collect(plan)) == 2


@pytest.mark.parametrize("wanted, terminal", [(True, True), (True, False), (False, True)])
def test_progress_bars_only_when_wanted_and_on_a_terminal(monkeypatch, wanted, terminal):
    # One rule for the trainer's, the evaluation's and the analyses' bars: a batch job's
    # log (stderr not a terminal) gets log lines, never bar redraws.
    import io
    import sys

    from protoseg.progress import show_progress

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stream())
    assert show_progress(wanted) is (wanted and terminal)
