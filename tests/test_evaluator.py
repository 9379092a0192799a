"""Tests for protoseg.engine.evaluator and protoseg.engine.distributed."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protoseg.config import EvalConfig
from protoseg.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast,
    cleanup,
    get_dist_info,
    init_distributed,
)
from protoseg.inference import (
    ConfusionMatrix,
    EvalResult,
    evaluate,
    format_table,
    infer_logits,
    save_result,
)
from protoseg.inference.core import _window_starts

NUM_CLASSES = 4


class DictModel(nn.Module):
    """Wrap a module so that it returns {"logits": ...} like the real networks."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.net(x)}


class OnesModel(nn.Module):
    """Logits of all ones: any average of them must be exactly one."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": x.new_ones(x.shape[0], NUM_CLASSES, *x.shape[-2:])}


class OracleModel(nn.Module):
    """Reads the label stored in channel 0 of the image and returns it as one-hot logits."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        label = x[:, 0].round().long().clamp(0, NUM_CLASSES - 1)
        return {"logits": F.one_hot(label, NUM_CLASSES).permute(0, 3, 1, 2).float()}


class ConstantModel(nn.Module):
    """Predicts class 0 everywhere."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = x.new_zeros(x.shape[0], NUM_CLASSES, *x.shape[-2:])
        logits[:, 0] = 1.0
        return {"logits": logits}


def conv_model(kernel: int, seed: int = 0, symmetric: bool = False) -> DictModel:
    """A fixed random conv net with 'same' zero padding."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, NUM_CLASSES, kernel, padding=kernel // 2)
    if symmetric:
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return DictModel(conv).eval()


def sliding(window: int, stride: int, per_batch: int = 4, **kw: object) -> EvalConfig:
    return EvalConfig(
        mode="sliding", window=window, stride=stride, windows_per_batch=per_batch, **kw
    )


def image(b: int, h: int, w: int, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- confusion matrix -------------------------------------------------------------------


def test_confusion_matrix_by_hand() -> None:
    # Class 3 only appears as a prediction on ignored pixels: absent from both -> NaN.
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 255, 255]])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 3, 1])
    cm = ConfusionMatrix(NUM_CLASSES, ignore_index=255)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.matrix, expected)
    assert cm.matrix.dtype == torch.int64
    iou = cm.iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 4, 1.0])
    assert math.isnan(iou[3].item())
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2 + 1) / 3 * 100)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6 * 100)
    # Accumulates across updates.
    cm.update(pred, target)
    assert torch.equal(cm.matrix, 2 * expected)
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and math.isnan(cm.miou())


def test_confusion_matrix_rejects_bad_input() -> None:
    cm = ConfusionMatrix(NUM_CLASSES)
    with pytest.raises(ValueError, match="label 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="predicted class 4"):
        cm.update(torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pixels"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    # All-ignored input counts nothing and is not an error.
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))
    assert int(cm.matrix.sum()) == 0


# --- sliding-window inference -----------------------------------------------------------


def test_window_starts_follow_cityscapes_protocol() -> None:
    assert _window_starts(2048, 769, 513) == [0, 513, 1026, 1279]
    assert _window_starts(1024, 769, 513) == [0, 255]
    assert _window_starts(769, 769, 513) == [0]


@pytest.mark.parametrize("window", [12, 16])
def test_sliding_single_window_equals_whole(window: int) -> None:
    model = conv_model(3)
    x = image(1, 12, 12)
    whole = infer_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    slid = infer_logits(model, x, sliding(window, 8), NUM_CLASSES)
    assert slid.shape == whole.shape == (1, NUM_CLASSES, 12, 12)
    assert slid.dtype == torch.float32
    torch.testing.assert_close(slid, whole)


def test_sliding_overlapping_windows_pointwise_equals_whole() -> None:
    model = conv_model(1)
    x = image(2, 19, 23)
    whole = infer_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    slid = infer_logits(model, x, sliding(8, 5, per_batch=3), NUM_CLASSES)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


def test_sliding_divides_by_overlap_count() -> None:
    # 17 x 29 with window 8 / stride 5: pixels are covered by 1, 2 or 4 windows.
    x = image(1, 17, 29)
    out = infer_logits(OnesModel(), x, sliding(8, 5, per_batch=2), NUM_CLASSES)
    assert out.shape == (1, NUM_CLASSES, 17, 29)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_sliding_pads_image_smaller_than_window() -> None:
    x = image(1, 5, 7)
    # A 3x3 conv only matches its whole-image output if the padding is zeros at the
    # bottom/right and the result is cropped back to the top-left.
    model = conv_model(3)
    whole = infer_logits(model, x, EvalConfig(mode="whole"), NUM_CLASSES)
    slid = infer_logits(model, x, sliding(8, 5), NUM_CLASSES)
    assert slid.shape == (1, NUM_CLASSES, 5, 7)
    torch.testing.assert_close(slid, whole)
    # Smaller than the window in one dimension only.
    x = image(1, 5, 20)
    pointwise = conv_model(1)
    whole = infer_logits(pointwise, x, EvalConfig(mode="whole"), NUM_CLASSES)
    slid = infer_logits(pointwise, x, sliding(8, 5), NUM_CLASSES)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_flip_tta_with_equivariant_model_is_unchanged(mode: str) -> None:
    # Width 18 with window 8 / stride 5 puts windows at 0, 5, 10: a mirror-symmetric grid,
    # so the sliding prediction of a symmetric conv is flip-equivariant too.
    x = image(1, 13, 18)
    kw = {"window": 8, "stride": 5} if mode == "sliding" else {}
    symmetric = conv_model(3, symmetric=True)
    plain = infer_logits(symmetric, x, EvalConfig(mode=mode, **kw), NUM_CLASSES)
    flipped = infer_logits(symmetric, x, EvalConfig(mode=mode, flip=True, **kw), NUM_CLASSES)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-5)


def test_flip_tta_averages_flipped_back_prediction() -> None:
    x = image(1, 13, 17)
    model = conv_model(3, symmetric=False)
    plain = infer_logits(model, x, EvalConfig(), NUM_CLASSES)
    flipped = infer_logits(model, x, EvalConfig(flip=True), NUM_CLASSES)
    expected = (plain + model(x.flip(-1))["logits"].flip(-1)) / 2
    assert not torch.allclose(flipped, plain, atol=1e-3)
    torch.testing.assert_close(flipped, expected, rtol=1e-5, atol=1e-5)


def test_multiscale_on_linear_image_equals_single_scale() -> None:
    # Bilinear resizing with align_corners=True is exact on an affine image, and a 1x1
    # conv keeps it affine, so every scale must give back the single-scale logits.
    h, w = 16, 24
    ys = torch.linspace(-1, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(-1, 1, w).view(1, w).expand(h, w)
    x = torch.stack([ys + xs, 2 * ys - xs, 0.5 * xs - 0.2]).unsqueeze(0)
    model = conv_model(1)
    single = infer_logits(model, x, EvalConfig(), NUM_CLASSES)
    multi = infer_logits(model, x, EvalConfig(scales=[0.5, 1.0, 1.5]), NUM_CLASSES)
    assert multi.shape == single.shape
    torch.testing.assert_close(multi, single, rtol=1e-4, atol=1e-4)


# --- evaluate / reporting ---------------------------------------------------------------


def toy_samples() -> list[dict[str, Tensor]]:
    """Two images whose channel 0 holds the label; 30 valid pixels, class 3 absent."""
    m1 = torch.zeros(4, 4, dtype=torch.int64)
    m1[0] = 1
    m1[3, 3] = 255
    m2 = torch.zeros(3, 5, dtype=torch.int64)
    m2[1] = 2
    samples = []
    for m in (m1, m2):
        img = torch.zeros(3, *m.shape)
        img[0] = m.clamp(max=NUM_CLASSES - 1).float()
        samples.append({"image": img, "mask": m})
    return samples


def loader(samples: list[dict[str, Tensor]]) -> DataLoader:
    return DataLoader(samples, batch_size=1, shuffle=False)  # type: ignore[arg-type]


# class 0: 21 gt pixels, all 30 predicted -> 21/30; classes 1, 2: IoU 0; class 3 absent.
CONSTANT_MIOU = 0.7 / 3 * 100


@pytest.mark.parametrize("cfg", [EvalConfig(), sliding(3, 2, per_batch=2)])
def test_evaluate_perfect_model(cfg: EvalConfig) -> None:
    model = OracleModel().train()
    result = evaluate(model, loader(toy_samples()), NUM_CLASSES, cfg, "cpu", progress=False)
    assert result.miou == pytest.approx(100.0)
    assert result.pixel_acc == pytest.approx(100.0)
    assert result.iou[:3] == pytest.approx([100.0] * 3) and math.isnan(result.iou[3])
    assert result.num_images == 2
    assert sum(map(sum, result.confusion)) == 30
    assert model.training, "evaluate must restore the previous training mode"


def test_release_miou_counts_a_class_absent_from_both_as_zero() -> None:
    # Class 3 is in neither the ground truth nor the prediction of the oracle.
    model = OracleModel().eval()
    cfg = EvalConfig(miou="release")
    result = evaluate(model, loader(toy_samples()), NUM_CLASSES, cfg, "cpu", progress=False)
    assert result.miou == pytest.approx(300.0 / 4)  # U2PL: mean of I / (U + 1e-10) over all 4
    assert math.isnan(result.iou[3])  # the per-class table still marks it absent
    nanmean = evaluate(model, loader(toy_samples()), NUM_CLASSES, EvalConfig(), "cpu")
    assert nanmean.miou == pytest.approx(100.0)
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))  # every class occurs
    assert cm.miou("release") == pytest.approx(cm.miou("nanmean"))
    assert math.isnan(ConfusionMatrix(NUM_CLASSES).miou("release"))
    with pytest.raises(ValueError, match="unknown mIoU definition"):
        cm.miou("macro")


def test_evaluate_constant_model() -> None:
    model = ConstantModel().eval()
    result = evaluate(model, loader(toy_samples()), NUM_CLASSES, EvalConfig(), "cpu")
    assert result.miou == pytest.approx(CONSTANT_MIOU)
    assert result.pixel_acc == pytest.approx(70.0)
    assert result.iou[:3] == pytest.approx([70.0, 0.0, 0.0])
    assert result.confusion[0] == [21, 0, 0, 0] and result.confusion[1] == [4, 0, 0, 0]
    assert not model.training


def make_result() -> EvalResult:
    return EvalResult(
        miou=55.5,
        iou=[70.0, 41.0, float("nan")],
        pixel_acc=90.25,
        num_images=3,
        confusion=[[7, 1, 0], [2, 5, 0], [0, 0, 0]],
    )


def test_format_table() -> None:
    table = format_table(make_result(), ["background", "cat", "dog"])
    lines = table.splitlines()
    assert any(line.split() == ["cat", "41.00"] for line in lines)
    assert any(line.split() == ["dog", "-"] for line in lines)
    assert any(line.split() == ["mIoU", "55.50"] for line in lines)
    assert "pixel accuracy" in table and "90.25" in table
    # Values are right-aligned in one column.
    value_ends = {len(line) for line in lines if line.split()[-1] in {"70.00", "41.00", "-"}}
    assert len(value_ends) == 1
    assert "class_2" in format_table(make_result(), [])
    with pytest.raises(ValueError):
        format_table(make_result(), ["a", "b"])


def test_save_result_writes_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "result.json"
    path.parent.mkdir()
    path.write_text("old")
    save_result(make_result(), path, ["background", "cat", "dog"], extra={"step": 7})
    data = json.loads(path.read_text())  # strict: a bare NaN would still parse, so check null
    assert data["iou"] == {"background": 70.0, "cat": 41.0, "dog": None}
    assert data["miou"] == 55.5 and data["pixel_acc"] == 90.25 and data["num_images"] == 3
    assert data["confusion"][1] == [2, 5, 0]
    assert data["step"] == 7
    assert "NaN" not in path.read_text()
    assert os.listdir(path.parent) == ["result.json"], "temp file left behind"
    with pytest.raises(ValueError, match="overwrite"):
        save_result(make_result(), path, extra={"miou": 1.0})


# --- distributed ------------------------------------------------------------------------


def test_init_distributed_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info, device = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0)
    assert info.is_main and not info.enabled
    assert device == torch.device("cpu")
    assert not dist.is_initialized()
    assert get_dist_info() == info
    t = torch.tensor([3])
    assert all_reduce_sum(t) is t and t.item() == 3
    assert broadcast(t).item() == 3
    barrier()
    cleanup()
    with pytest.raises(ValueError, match="choose"):
        init_distributed("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            init_distributed("cuda")


def rank_data(rank: int) -> tuple[Tensor, Tensor]:
    """Different pred/target data on each rank (with ignore pixels)."""
    g = torch.Generator().manual_seed(100 + rank)
    target = torch.randint(0, NUM_CLASSES, (6, 7), generator=g)
    target[0, : rank + 2] = 255
    pred = torch.randint(0, NUM_CLASSES, (6, 7), generator=g)
    return pred, target


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        info, device = init_distributed("cpu")
        assert dist.get_backend() == "gloo"
        assert info == DistInfo(rank=rank, world_size=world_size, local_rank=rank)
        assert get_dist_info() == info and info.enabled and info.is_main == (rank == 0)
        cm = ConfusionMatrix(NUM_CLASSES, device=device)
        cm.update(*rank_data(rank))
        cm.reduce()
        flag = broadcast(torch.tensor([rank + 10]), src=1)
        # Each rank evaluates its own image of the toy set; the result must be global.
        shard = [toy_samples()[rank]]
        result = evaluate(ConstantModel(), loader(shard), NUM_CLASSES, EvalConfig(), device)
        barrier()
        torch.save(
            {"matrix": cm.matrix, "flag": int(flag.item()), "result": result.to_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        cleanup()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes (torch, gloo): tens of seconds on 2 cores
def test_two_process_gloo_reduce(tmp_path: Path) -> None:
    world_size = 2
    mp.spawn(_dist_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    single = ConfusionMatrix(NUM_CLASSES)
    for rank in range(world_size):
        single.update(*rank_data(rank))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for out in outs:
        assert torch.equal(out["matrix"], single.matrix)
        assert out["flag"] == 11
        assert out["result"]["num_images"] == 2
        assert out["result"]["miou"] == pytest.approx(CONSTANT_MIOU)
    assert outs[0]["result"] == outs[1]["result"]


def test_progress_bar_only_on_a_terminal(capsys) -> None:
    # pytest's captured stderr is no terminal, as a batch job's log is not: no bar there.
    evaluate(OracleModel(), loader(toy_samples()), NUM_CLASSES, EvalConfig(), "cpu", progress=True)
    assert "eval" not in capsys.readouterr().err
