"""Components methods assemble: strong augmentations, losses, the EMA teacher, pseudo-labels."""

from __future__ import annotations

import pytest
import torch
from method_contract import tiny_config

from protoseg.components import (
    EMATeacher,
    PhotometricAugment,
    confident,
    cutmix_boxes,
    hard_labels,
    strong_view,
    valid_pixels,
)
from protoseg.components.augment import (
    box_masks,
    classmix,
    cutmix,
    cutout,
    half_area_boxes,
    strong_augment,
)
from protoseg.components.losses import SegmentationLoss, masked_cross_entropy, ohem_cross_entropy
from protoseg.components.weak_strong import random_area_boxes
from protoseg.config import IMAGENET_MEAN, IMAGENET_STD
from protoseg.models import create_model


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


# ---- photometric augmentation and the weak-to-strong view --------------------------------------
CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


def normalised(b=4, h=16, w=20, seed=0):
    """Random [0, 1] images normalised with the ImageNet statistics."""
    rgb = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return (rgb - MEAN) / STD


def test_photometric_changes_colours_not_geometry():
    augment = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD, jitter_prob=1.0, blur_prob=0.0)
    images = normalised()
    perm = torch.randperm(16 * 20, generator=torch.Generator().manual_seed(1))

    def shuffle(x):
        return x.flatten(2)[..., perm].reshape(x.shape)

    torch.manual_seed(2)
    out = augment(images)
    torch.manual_seed(2)
    out_of_shuffled = augment(shuffle(images))
    # A colour map of each pixel (with image-wide statistics) commutes with moving pixels:
    # nothing moves, so labels need no transform.
    torch.testing.assert_close(out_of_shuffled, shuffle(out), atol=1e-4, rtol=0)
    assert out.shape == images.shape and (out - images).abs().mean() > 0.05


def test_photometric_draws_per_image_and_per_call():
    augment = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD)
    images = normalised(b=1).expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    first, second = augment(images), augment(images)
    # One draw for the whole batch would give 8 equal images; per image ~92% are altered.
    assert torch.unique(first.flatten(1), dim=0).shape[0] >= 6
    assert not torch.equal(first, second)


def test_photometric_follows_unimatch_probabilities():
    augment = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD)
    images = normalised(b=400, h=6, w=6)
    torch.manual_seed(0)
    out = augment(images)
    rgb = out * STD + MEAN
    grey = (rgb.amax(dim=1) - rgb.amin(dim=1)).flatten(1).amax(dim=1) < 1e-4
    untouched = (out - images).abs().flatten(1).amax(dim=1) < 1e-4
    assert 0.14 < grey.float().mean() < 0.26  # p = 0.2
    # No jitter (0.2), no greyscale (0.8), no blur (0.5): 0.08 of the images.
    assert 0.04 < untouched.float().mean() < 0.12


def test_photometric_leaves_padding_neutral():
    augment = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD, jitter_prob=1.0, blur_prob=1.0)
    images = normalised(b=3)
    valid = torch.ones(3, 16, 20, dtype=torch.bool)
    valid[:, 11:] = False
    valid[:, :, 15:] = False
    images = images.masked_fill(~valid[:, None], 0.0)  # the loader pads with the mean
    torch.manual_seed(0)
    out = augment(images, valid)
    assert (out.permute(1, 0, 2, 3)[:, ~valid] == 0).all()
    assert not torch.allclose(out[:, :, :11, :15], images[:, :, :11, :15], atol=1e-3)


def test_random_area_boxes_follow_unimatch():
    torch.manual_seed(0)
    boxes = random_area_boxes(200, 64, 64, CPU)
    area = boxes.flatten(1).float().mean(dim=1)
    # Area U(0.02, 0.4) of the image, sides truncated to whole pixels.
    assert area.max() <= 0.4 and area.min() > 0.01
    assert area.min() < 0.05 and area.max() > 0.35 and 0.15 < area.mean() < 0.23
    rows, cols = boxes.any(dim=2).sum(dim=1), boxes.any(dim=1).sum(dim=1)
    assert torch.equal(rows * cols, boxes.flatten(1).sum(dim=1))  # one rectangle each
    ratio = rows.float() / cols.float()
    assert ratio.min() < 0.5 and ratio.max() > 2.0 and ratio.max() < 4.0


def test_cutmix_boxes_are_drawn_per_image():
    torch.manual_seed(0)
    boxes = cutmix_boxes("random_area", 0.5, 400, 32, 32, CPU).flatten(1)
    has_box, area = boxes.any(dim=1), boxes.float().mean(dim=1)
    assert 0.42 < has_box.float().mean() < 0.58
    assert area.max() <= 0.4 and area[has_box].min() < 0.05  # UniMatch's box, not half
    assert not cutmix_boxes("random_area", 0.0, 8, 32, 32, CPU).any()
    half = cutmix_boxes("half_area", 1.0, 8, 20, 30, CPU).flatten(1).sum(dim=1).float()
    assert ((half - 300).abs() <= 30).all()
    with pytest.raises(ValueError, match="unknown CutMix box shape"):
        cutmix_boxes("circle", 1.0, 2, 8, 8, CPU)


def test_strong_view_recolours_then_pastes_the_partners_strong_pixels_and_targets():
    images, labels, conf, valid = encoded_batch()
    valid[1, :, -3:] = False
    boxes = torch.zeros(4, 20, 30, dtype=torch.bool)
    boxes[:2, :10, :15] = True  # images 2 and 3 get no box
    seen = []

    def recolour(x, v):
        seen.append(v)
        return x + 100

    out_img, out_lab, out_conf, out_valid = strong_view(
        recolour, boxes, images, labels, conf, valid
    )
    partner = torch.tensor([1, 2, 3, 0])
    expected = [torch.where(boxes, t[partner], t) for t in (labels, conf, valid)]
    assert torch.equal(out_img, torch.where(boxes[:, None], images[partner], images) + 100)
    assert torch.equal(out_lab, expected[0]) and torch.equal(out_conf, expected[1])
    assert torch.equal(out_valid, expected[2]) and seen[0] is valid
    assert torch.equal(out_lab[2:], labels[2:])


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
    got = ohem_cross_entropy(logits, target, threshold=0.7, min_kept_per_image=1)
    assert got.item() == pytest.approx(per[prob <= 0.7].mean().item(), rel=1e-5)
    # min_kept=3 raises the cut to the third-lowest probability
    got3 = ohem_cross_entropy(logits, target, threshold=0.7, min_kept_per_image=3)
    assert got3.item() == pytest.approx(
        per.sort(descending=True).values[:3].mean().item(), rel=1e-5
    )
    ignored = torch.full_like(target, 255)
    assert SegmentationLoss("ohem")(logits, ignored).item() == 0.0


def test_ohem_floor_is_per_image():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    per = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten()
    # Threshold 0 keeps nothing by itself: the floor alone decides, 10 pixels per image.
    two = ohem_cross_entropy(logits, target, 255, 0.0, 10)
    assert two.item() == pytest.approx(per.sort(descending=True).values[:20].mean().item())
    # The same two images twice in one call keep each of those pixels twice: the same loss.
    # A floor for the whole call would keep only the 10 hardest twice, a different mean.
    doubled = torch.cat([logits, logits]), torch.cat([target, target])
    four = ohem_cross_entropy(*doubled, 255, 0.0, 10)
    assert four.item() == pytest.approx(two.item(), rel=1e-6)
    assert SegmentationLoss("ohem", 255, 0.0, 10)(logits, target).item() == pytest.approx(
        two.item()
    )


# ---- EMA teacher and pseudo-labels -------------------------------------------------------------
def test_ema_teacher_follows_the_student():
    cfg = tiny_config("cutmix_seg")
    student = create_model(cfg.model, cfg.data.num_classes)
    teacher = EMATeacher(student, ema_decay=0.99)
    s_param = next(student.parameters())
    t_param = next(teacher.network.parameters())
    with torch.no_grad():
        s_param.add_(1.0)
    teacher.follow(student, steps_after_warmup=-3)  # warm-up: the teacher is the student
    assert torch.equal(t_param, s_param)
    with torch.no_grad():
        s_param.add_(1.0)
    teacher.follow(student, 0)  # t = 0: decay 0, a copy again (as U2PL)
    assert torch.equal(t_param, s_param)
    for t, decay in [(1, 0.5), (1000, 0.99)]:  # then min(1 - 1/(t+1), 0.99)
        with torch.no_grad():
            s_param.add_(1.0)
        before = t_param.clone()
        teacher.follow(student, t)
        assert torch.allclose(t_param, decay * before + (1 - decay) * s_param, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.network.parameters())


@pytest.mark.parametrize(
    ("ema_start", "decays"),
    [
        ("ramp", [0.0, 1 / 2, 2 / 3, 3 / 4, 4 / 5, 5 / 6]),  # min(1 - 1/(t+1), 0.99) from t = 0
        ("after_epoch", [0.0, 0.0, 0.0, 0.0, 4 / 5, 5 / 6]),  # a copy for one epoch (U2PL)
    ],
)
def test_ema_start(ema_start, decays):
    cfg = tiny_config("cutmix_seg")
    student = create_model(cfg.model, cfg.data.num_classes)
    teacher = EMATeacher(student, 0.99, ema_start=ema_start)
    teacher.setup(steps_per_epoch=4)
    s_param = next(student.parameters())
    t_param = next(teacher.network.parameters())
    for t, decay in enumerate(decays):
        with torch.no_grad():
            s_param.add_(1.0)
        before = t_param.clone()
        teacher.follow(student, t)
        assert teacher.decay(t) == pytest.approx(decay)
        assert torch.allclose(t_param, decay * before + (1 - decay) * s_param, atol=1e-6)
    assert teacher.decay(10_000) == 0.99
    with pytest.raises(ValueError, match="ema_start"):
        tiny_config("cutmix_seg", "method.ema_start=later")


def test_teacher_bn_modes():
    cfg = tiny_config("cutmix_seg")
    student = create_model(cfg.model, cfg.data.num_classes)
    images = torch.randn(2, 3, 33, 41) * 3 + 1

    def running_mean(teacher):
        return teacher.network.backbone.trunk.bn1.running_mean

    before = running_mean(EMATeacher(student, 0.99)).clone()
    forward = EMATeacher(student, 0.99, "forward")
    forward.refresh_bn(images)  # only the student_batch mode refreshes on the student's batch
    assert torch.equal(running_mean(forward), before)
    forward.predict(images)  # refreshes BN statistics on the teacher's own input first
    assert not torch.equal(running_mean(forward), before)
    assert not forward.network.training
    batch = EMATeacher(student, 0.99, "student_batch")
    batch.predict(images)  # pseudo-labels with the statistics it has
    assert torch.equal(running_mean(batch), before)
    batch.refresh_bn(images)
    assert not torch.equal(running_mean(batch), before)
    assert not batch.network.training
    copy = EMATeacher(student, 0.99, "copy")
    copy.predict(images)
    copy.refresh_bn(images)
    assert torch.equal(running_mean(copy), before)
    with torch.no_grad():
        student.backbone.trunk.bn1.running_mean.add_(1.0)
    copy.follow(student, 5)
    assert torch.equal(running_mean(copy), student.backbone.trunk.bn1.running_mean)


def test_pseudo_labels_and_confidence_mask():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.1]]]])  # (1, 2, 1, 2)
    labels, conf = hard_labels(logits)
    assert labels.tolist() == [[[0, 1]]]
    assert conf[0, 0, 0].item() == pytest.approx(torch.softmax(torch.tensor([2.0, 0.0]), 0)[0])
    keep = confident(conf, 0.6, torch.tensor([[[True, True]]]))
    assert keep.tolist() == [[[True, False]]]
    padded = valid_pixels({"valid": torch.tensor([[[1, 0]]])}, logits)
    assert padded.tolist() == [[[True, False]]]
    assert valid_pixels({}, logits).all()


def test_cps_box_masks_cover_a_share_drawn_from_the_range():
    torch.manual_seed(0)
    one = box_masks(64, 40, 60, (0.25, 0.5), 1, torch.device("cpu"))
    share = one.float().mean(dim=(1, 2))
    # One box: its area share, up to rounding of its sides; spread over the range.
    assert (share > 0.23).all() and (share < 0.52).all() and share.std() > 0.03
    whole = box_masks(2, 40, 60, (1.0, 1.0), 1, torch.device("cpu"))
    assert whole.all()
    # Three boxes of a third of the share each: overlaps cancel, so never more than the share.
    three = box_masks(64, 40, 60, (0.25, 0.5), 3, torch.device("cpu"))
    assert (three.float().mean(dim=(1, 2)) < 0.52).all() and three.any()
