"""Method objects: strong augmentations, losses, EMA teacher, PCR branch — on tiny CPU inputs."""

from __future__ import annotations

import pytest
import torch

from protoseg.config import load_config
from protoseg.engine.optim import build_optimizer
from protoseg.methods import METHODS, WarmupContext, create_method
from protoseg.methods.augment import classmix, cutmix, cutout, half_area_boxes, strong_augment
from protoseg.methods.losses import SegmentationLoss, masked_cross_entropy, ohem_cross_entropy
from protoseg.models import create_model

NUM_CLASSES = 3


def tiny_cfg(method: str = "pcr", *extra: str):
    return load_config(
        None,
        [
            "data.root=unused",
            f"data.num_classes={NUM_CLASSES}",
            "model.backbone=resnet18",
            "model.output_stride=16",
            f"method.name={method}",
            "method.warmup_epochs=0",
            "method.prototypes_per_class=2",
            "method.sample_grid=8",
            "method.mix_prob=1.0",
            "method.confidence_threshold=0.0",
            "train.loss=ce",
            *extra,
        ],
    )


def make_method(method: str = "pcr", *extra: str):
    torch.manual_seed(0)
    cfg = tiny_cfg(method, *extra)
    model = create_model(cfg.model, cfg.data.num_classes)
    m = create_method(cfg.method.name, model, cfg)
    m.setup(steps_per_epoch=10)
    return m


def batches(b=2, h=33, w=41):
    gen = torch.Generator().manual_seed(1)
    labeled = {
        "image": torch.randn(b, 3, h, w, generator=gen),
        "mask": torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen),
    }
    labeled["mask"][:, :2] = 255
    unlabeled = {"image": torch.randn(b, 3, h, w, generator=gen)}
    return labeled, unlabeled


def init_bank(method) -> None:
    labeled, _ = batches()
    method.on_warmup_end(WarmupContext([labeled], torch.device("cpu"), seed=0))


# ---- strong augmentations -------------------------------------------------------------------
def encoded_batch(b=4, h=20, w=30):
    """Every pixel of image i carries i in the image, the label and the confidence."""
    ids = torch.arange(b, dtype=torch.float32)[:, None, None].expand(b, h, w)
    images = ids[:, None].expand(b, 3, h, w).clone()
    return images, ids.long().clone(), ids / 10, torch.ones(b, h, w, dtype=torch.bool)


def test_half_area_boxes_have_half_the_area():
    torch.manual_seed(0)
    for h, w in [(20, 30), (33, 41), (64, 64)]:
        boxes = half_area_boxes(16, h, w, torch.device("cpu"))
        areas = boxes.flatten(1).sum(1).float()
        assert ((areas - h * w / 2).abs() <= max(h, w)).all()  # exact up to rounding a side
        widths = boxes.any(dim=1).sum(dim=1)
        assert (widths > w // 2).all()


@pytest.mark.parametrize("mix", [cutmix, classmix])
def test_mixing_moves_image_label_and_confidence_together(mix):
    torch.manual_seed(0)
    images, labels, conf, valid = encoded_batch()
    out_img, out_lab, out_conf, out_valid = mix(images, labels, conf, valid)
    source = out_img[:, 0]
    assert torch.equal(source.long(), out_lab)
    assert torch.allclose(out_conf, source / 10)
    own = torch.arange(4)[:, None, None].float()
    partner = (own + 1) % 4
    assert ((source == own) | (source == partner)).all()  # pasted from image (i + 1) mod B
    assert (source == partner).any() and out_valid.all()


def test_cutout_erases_and_drops_targets():
    torch.manual_seed(0)
    images, labels, conf, valid = encoded_batch()
    conf = torch.ones_like(conf)
    out_img, out_lab, out_conf, _ = cutout(images + 1, labels, conf, valid)
    erased = out_img[:, 0] == 0
    assert torch.equal(erased, out_conf == 0)  # exactly the erased pixels leave the loss
    assert torch.equal(out_lab, labels)
    frac = erased.flatten(1).float().mean(1)
    assert ((frac - 0.5).abs() < 0.1).all()


def test_strong_augment_probability_zero_is_identity():
    images, labels, conf, valid = encoded_batch()
    out = strong_augment("cutmix", 0.0, images, labels, conf, valid)
    assert out[0] is images and out[1] is labels
    with pytest.raises(ValueError, match="unknown strong augmentation"):
        strong_augment("mixup", 1.0, images, labels, conf, valid)


# ---- losses ----------------------------------------------------------------------------------
def test_masked_ce_keeps_exactly_the_confident_pixels():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    conf = torch.rand(2, 5, 6)
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    keep = conf >= 0.6
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = per_pixel[keep].sum() / valid.sum()
    assert masked_cross_entropy(logits, target, keep, valid).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    none = masked_cross_entropy(logits, target, torch.zeros_like(keep), valid)
    assert none.item() == 0.0


def test_ohem_keeps_hard_pixels_and_min_kept():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0] = torch.tensor([5.0, 2.0, 0.0, -3.0])  # target 0: easy -> hard
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    per = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten()
    prob = torch.exp(-per)
    # threshold 0.7 keeps the two pixels with target probability <= 0.7
    got = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=1)
    assert got.item() == pytest.approx(per[prob <= 0.7].mean().item(), rel=1e-5)
    # min_kept=3 raises the cut to the third-lowest probability
    got3 = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=3)
    assert got3.item() == pytest.approx(
        per.sort(descending=True).values[:3].mean().item(), rel=1e-5
    )
    ignored = torch.full_like(target, 255)
    assert SegmentationLoss("ohem")(logits, ignored).item() == 0.0


# ---- the method objects ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_a_finite_loss_and_gradients(name):
    method = make_method(name)
    if name == "pcr":
        init_bank(method)
    labeled, unlabeled = batches()
    method.train()
    out = method.training_step(labeled, unlabeled, step=0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    teacher = getattr(method, "teacher", None)
    if teacher is not None:
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_only_the_student_is_optimised():
    method = make_method("pcr")
    opt = build_optimizer(method.model, tiny_cfg().optim)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in method.model.parameters()}
    assert not optimised & {id(p) for p in method.teacher.parameters()}
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[1] == pytest.approx(lrs[0] * 10)  # decoder lr multiplier


def test_ema_teacher_follows_the_student():
    method = make_method("cutmix_seg", "method.warmup_epochs=0.5")  # 5 warm-up steps
    student = list(method.model.parameters())[0]
    teacher = list(method.teacher.parameters())[0]
    with torch.no_grad():
        student.add_(1.0)
    method.after_optimizer_step(step=2)  # warm-up: the teacher is the student
    assert torch.equal(teacher, student)
    before = teacher.clone()
    with torch.no_grad():
        student.add_(1.0)
    method.after_optimizer_step(step=5)  # t = 0: decay 0, a copy again (as U2PL)
    assert torch.equal(teacher, student)
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    method.after_optimizer_step(step=6)  # t = 1: decay 0.5
    assert torch.allclose(teacher, 0.5 * before + 0.5 * student)
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    method.after_optimizer_step(step=1000)  # capped at ema_decay 0.99
    assert torch.allclose(teacher, 0.99 * before + 0.01 * student, atol=1e-6)


def test_pcr_updates_the_bank_and_uses_prototype_losses():
    method = make_method("pcr")
    init_bank(method)
    before = method.bank.prototypes.clone()
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=0)
    assert {"loss_sup", "loss_unsup", "loss_proto_sup", "loss_proto_unsup"} <= set(out)
    assert not torch.equal(method.bank.prototypes, before)
    assert out["prototypes_updated"] > 0


def test_pcr_ablations():
    labeled, unlabeled = batches()
    frozen = make_method("pcr", "method.update_prototypes=false")
    init_bank(frozen)
    before = frozen.bank.prototypes.clone()
    out = frozen.training_step(labeled, unlabeled, step=0)
    assert torch.equal(frozen.bank.prototypes, before) and "loss_proto_unsup" in out

    linear_only = make_method("pcr", "method.proto_head=false", "method.update_prototypes=false")
    init_bank(linear_only)
    out = linear_only.training_step(labeled, unlabeled, step=0)
    assert "loss_proto_sup" not in out and "loss_unsup" in out

    proto_only = make_method("pcr", "method.linear_head=false")
    init_bank(proto_only)
    assert proto_only.find_unused_parameters
    out = proto_only.training_step(labeled, unlabeled, step=0)
    assert "loss_unsup" not in out and "loss_proto_unsup" in out
    out["loss"].backward()
    classifier_last = list(proto_only.model.parameters())[-1]
    assert classifier_last.grad is None  # the linear classifier is not trained


def test_pcr_refuses_to_train_without_a_bank():
    method = make_method("pcr")
    labeled, unlabeled = batches()
    with pytest.raises(RuntimeError, match="not initialised"):
        method.training_step(labeled, unlabeled, step=0)
    assert method.needs_warmup_hook()
    init_bank(method)
    assert not method.needs_warmup_hook()


def test_pcr_loads_a_saved_bank(tmp_path):
    source = make_method("pcr")
    init_bank(source)
    path = tmp_path / "bank.pt"
    torch.save(source.bank.state_dict(), path)
    target = make_method("pcr", f"method.init_bank={path}")
    target.on_warmup_end(WarmupContext(None, torch.device("cpu")))
    assert torch.equal(target.bank.prototypes, source.bank.prototypes)
    torch.save(torch.zeros(2, 2), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected prototypes of shape"):
        target.load_bank(tmp_path / "bad.pt")


def test_prototype_head_inference_model():
    method = make_method("pcr")
    init_bank(method)
    assert method.heads == ("linear", "prototype")
    images = torch.randn(1, 3, 29, 37)
    out = method.inference_model("prototype").eval()(images)
    assert out["logits"].shape == (1, NUM_CLASSES, 29, 37)
    with pytest.raises(ValueError):
        make_method("supervised").inference_model("prototype")
