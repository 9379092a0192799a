"""UniMatch V2's parts: complementary dropout, the reversed partner, the EMA teacher's buffer
mode, AdamW with a locked encoder, and the method's step on a tiny stand-in network."""

from __future__ import annotations

import pytest
import torch
from feature_transform_stand_in import STAND_IN
from method_contract import IGNORE, batches, tiny_config
from torch import nn

from protoseg.components import (
    EMATeacher,
    PhotometricAugment,
    complementary_channel_masks,
    complementary_dropout,
    cutmix_boxes,
    partner_of,
    strong_view,
    takes_feature_transform,
)
from protoseg.components import feature_dropout as dropout_module
from protoseg.config import ConfigError, OptimConfig
from protoseg.engine.optim import build_optimizer
from protoseg.methods import create_method
from protoseg.methods import unimatch_v2 as v2_module
from protoseg.models import create_model, lock_backbone

STAND_IN_MODEL = (f"model.name={STAND_IN}",)


def build(*extra: str, seed: int = 0):
    """unimatch_v2 on the stand-in network, in training mode (the encoder locked, as the
    Trainer does, when optim.lock_backbone is set)."""
    torch.manual_seed(seed)
    cfg = tiny_config("unimatch_v2", *STAND_IN_MODEL, *extra)
    network = create_model(cfg.model, cfg.data.num_classes)
    if cfg.optim.lock_backbone:
        lock_backbone(network)
    method = create_method(network, cfg)
    method.setup(steps_per_epoch=10)
    method.train()
    return method, cfg


# ---- complementary channel dropout --------------------------------------------------------------
@pytest.mark.parametrize("images", [1, 4, 5])
def test_masks_are_complementary_and_leave_half_the_images_untouched(images):
    first, second = complementary_channel_masks(
        images, 64, generator=torch.Generator().manual_seed(0)
    )
    assert first.shape == second.shape == (images, 64)
    untouched = (first == 1).all(dim=1)
    assert torch.equal(untouched, (second == 1).all(dim=1))
    assert int(untouched.sum()) == images // 2  # int(B x (1 - 0.5)), as the release
    masked = ~untouched
    assert set(first[masked].unique().tolist()) <= {0.0, 2.0}
    torch.testing.assert_close(first[masked] + second[masked], torch.full_like(first[masked], 2))
    if masked.any():  # Bernoulli(0.5): about half the channels of a masked image dropped
        assert 0.25 < float((first[masked] == 0).float().mean()) < 0.75


def test_masks_are_deterministic_with_a_generator():
    def draw(seed):
        return complementary_channel_masks(6, 16, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("layout", ["tokens", "maps"])
def test_dropout_scales_by_two_and_applies_one_mask_to_every_map(layout):
    b, c = 4, 12
    shapes = [(2 * b, 5, c)] * 4 if layout == "tokens" else [(2 * b, c, 3, 2)] * 4
    features = [torch.rand(s) + 0.5 for s in shapes]  # no zero entries
    gen = torch.Generator().manual_seed(1)
    out = complementary_dropout(features, generator=gen)
    first, second = complementary_channel_masks(b, c, generator=torch.Generator().manual_seed(1))
    masks = torch.cat([first, second])
    for f, o in zip(features, out):
        ratio = o / f
        # One factor per image and channel, constant over positions: (2B, C).
        per_channel = ratio[:, 0, :] if layout == "tokens" else ratio[:, :, 0, 0]
        expand = per_channel[:, None, :] if layout == "tokens" else per_channel[:, :, None, None]
        torch.testing.assert_close(ratio, expand.expand_as(ratio))
        torch.testing.assert_close(per_channel, masks)
    # Every map got the same mask: the same channels are zero at all four levels.
    zeros = [(o == 0).any(dim=1 if layout == "tokens" else (2, 3)) for o in out]
    assert all(torch.equal(z, zeros[0]) for z in zeros)
    assert zeros[0].any()


def test_dropout_keeps_dtype_and_device_and_refuses_bad_maps():
    out = complementary_dropout([torch.ones(4, 3, 8, dtype=torch.bfloat16)])
    assert out[0].dtype == torch.bfloat16 and set(out[0].unique().tolist()) <= {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="even batch"):
        complementary_dropout([torch.ones(3, 2, 8)])
    with pytest.raises(ValueError, match="same batch and width"):
        complementary_dropout([torch.ones(4, 2, 8), torch.ones(4, 2, 6)])
    with pytest.raises(ValueError, match="expected"):
        complementary_dropout([torch.ones(4, 8)])


# ---- the reversed partner and the strong views --------------------------------------------------
def test_reversed_partner_is_the_batch_flipped():
    rows = torch.arange(5)
    assert partner_of(rows, "reversed").tolist() == [4, 3, 2, 1, 0]
    assert partner_of(rows, "next").tolist() == [1, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="reversed"):
        partner_of(rows, "random")


def test_strong_view_pastes_from_the_reversed_batch():
    torch.manual_seed(0)
    b, h, w = 4, 10, 12
    images = torch.randn(b, 3, h, w)
    labels = torch.arange(b)[:, None, None].expand(b, h, w).clone()
    conf, valid = torch.rand(b, h, w), torch.rand(b, h, w) > 0.2
    boxes = cutmix_boxes("random_area", 1.0, b, h, w, images.device)
    out_img, out_lab, out_conf, out_valid = strong_view(
        lambda x, v: x + 1, boxes, images, labels, conf, valid, partner="reversed"
    )
    source = torch.where(
        boxes, (b - 1 - torch.arange(b))[:, None, None], torch.arange(b)[:, None, None]
    )
    assert torch.equal(out_lab, source)
    assert torch.equal(out_img, torch.where(boxes[:, None], images.flip(0), images) + 1)
    assert torch.equal(out_conf, torch.where(boxes, conf.flip(0), conf))
    assert torch.equal(out_valid, torch.where(boxes, valid.flip(0), valid))


# ---- the EMA teacher over parameters and buffers ------------------------------------------------
def test_teacher_ema_mode_averages_buffers_and_predicts_without_a_refresh():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    teacher = EMATeacher(student, ema_decay=0.996, bn_mode="ema")
    student[1].running_mean.fill_(2.0)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    teacher.follow(student, 0)  # t = 0: decay 0, a copy of parameters and buffers
    assert torch.equal(teacher.network[1].running_mean, student[1].running_mean)
    assert torch.equal(teacher.network[0].weight, student[0].weight)
    student[1].running_mean.fill_(4.0)
    student[1].num_batches_tracked.fill_(7)
    teacher.follow(student, 3)  # decay min(1 - 1/4, 0.996) = 0.75
    torch.testing.assert_close(teacher.network[1].running_mean, torch.full((4,), 2.5))
    assert int(teacher.network[1].num_batches_tracked) == 7
    before = teacher.network[1].running_mean.clone()
    training = []
    teacher.network.register_forward_pre_hook(lambda m, _: training.append(m.training))
    teacher.predict(torch.randn(2, 3, 5, 5))
    assert training == [False]  # one eval-mode pass, no train-mode refresh
    assert torch.equal(teacher.network[1].running_mean, before)


def test_unimatch_v2_teacher_follows_from_step_zero():
    method, _ = build()
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)
    for t, s in zip(method.teacher.network.parameters(), method.student.parameters()):
        assert torch.equal(t, s)
    assert method.teacher.decay(5) == pytest.approx(1 - 1 / 6)
    assert method.teacher.decay(10_000) == 0.996
    assert method.deploy()["network"] is method.teacher.network  # the teacher is deployed


# ---- AdamW, the head's lr multiplier, the locked encoder ----------------------------------------
def test_adamw_groups_lr_betas_and_weight_decay():
    cfg = tiny_config(
        "unimatch_v2",
        *STAND_IN_MODEL,
        "optim.name=adamw",
        "optim.lr=5e-6",
        "optim.decoder_lr_mult=40",
        "optim.weight_decay=0.01",
    )
    network = create_model(cfg.model, cfg.data.num_classes)
    optimiser = build_optimizer(network, cfg.optim)
    assert isinstance(optimiser, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimiser.param_groups}
    assert groups["backbone"]["lr"] == 5e-6 and groups["decoder"]["lr"] == pytest.approx(2e-4)
    for g in groups.values():
        assert g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.01
    encoder, decoder = network.param_groups()
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in encoder}
    assert {id(p) for p in groups["decoder"]["params"]} == {id(p) for p in decoder}


def test_adamw_multi_tensor_path_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    nets = [nn.Linear(5, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01, decoder_lr_mult=1.0)
    fast = build_optimizer(nets[0], cfg)
    loop = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    x = torch.randn(8, 5)
    for _ in range(3):
        for net, opt in zip(nets, (fast, loop)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_locked_encoder_gets_no_gradient_and_no_group():
    method, cfg = build("optim.lock_backbone=true", "optim.name=adamw")
    encoder, decoder = method.student.param_groups()
    assert not any(p.requires_grad for p in encoder) and all(p.requires_grad for p in decoder)
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)["loss"].backward()
    assert all(p.grad is None for p in encoder) and all(p.grad is not None for p in decoder)
    optimiser = build_optimizer(method.student, cfg.optim)
    assert [g["name"] for g in optimiser.param_groups] == ["decoder"]


def test_lock_backbone_of_a_network_without_a_backbone_group_is_refused():
    with pytest.raises(ValueError, match="optim.lock_backbone"):
        lock_backbone(torch.nn.Conv2d(3, 4, 1))


def test_optimiser_settings_are_checked():
    with pytest.raises(ConfigError, match="optim.name"):
        tiny_config("supervised", "optim.name=lamb")
    with pytest.raises(ConfigError, match="optim.betas"):
        tiny_config("supervised", "optim.betas=[0.9]")


# ---- the method's step -------------------------------------------------------------------------
def test_network_without_the_feature_interface_is_refused():
    cfg = tiny_config("unimatch_v2")  # DeepLabv3+: no feature_transform
    network = create_model(cfg.model, cfg.data.num_classes)
    assert not takes_feature_transform(network)
    with pytest.raises(ValueError, match="feature_transform"):
        create_method(network, cfg)
    cfg = tiny_config("unimatch_v2", "method.comp_drop=false")
    create_method(create_model(cfg.model, cfg.data.num_classes), cfg)  # no dropout: any network
    with pytest.raises(ConfigError, match="method.comp_drop_unmasked"):
        tiny_config("unimatch_v2", "method.comp_drop_unmasked=2")
    with pytest.raises(ConfigError, match="method.mix_partner"):
        tiny_config("unimatch_v2", "method.mix_partner=random")
    with pytest.raises(ConfigError, match="method.teacher_bn"):
        tiny_config("unimatch_v2", "method.teacher_bn=average")


def test_defaults_are_the_release_recipe():
    _, cfg = build()
    c = cfg.method
    assert (c.warmup_epochs, c.ema_decay, c.ema_start, c.teacher_bn) == (0.0, 0.996, "ramp", "ema")
    assert (c.confidence_threshold, c.mix_prob, c.mix_box, c.mix_partner) == (
        0.95,
        0.5,
        "random_area",
        "reversed",
    )
    assert c.comp_drop and c.comp_drop_unmasked == 0.5


def test_loss_is_the_release_formula_by_hand(monkeypatch):
    method, _ = build("method.confidence_threshold=0.4", "method.mix_prob=1.0")
    labeled, unlabeled = batches(b=4)
    unlabeled["valid"] = torch.ones(4, 33, 41, dtype=torch.bool)
    unlabeled["valid"][:, :, -5:] = False  # crop padding on the right
    record = {}
    teacher_predict, run, drop = (
        method.teacher.predict,
        method.run_student,
        method.drop_complementary,
    )

    def spy_teacher(x):
        record["teacher"] = teacher_predict(x)["logits"]
        return {"logits": record["teacher"]}

    def spy_run(x, **kw):
        record.setdefault("inputs", []).append((x, kw))
        return run(x, **kw)

    def spy_drop(features):
        record["dropped"] = drop(features)
        return record["dropped"]

    monkeypatch.setattr(method.teacher, "predict", spy_teacher)
    monkeypatch.setattr(method, "run_student", spy_run)
    monkeypatch.setattr(method, "drop_complementary", spy_drop)
    boxes = []
    monkeypatch.setattr(
        v2_module, "cutmix_boxes", lambda *a: boxes.append(cutmix_boxes(*a)) or boxes[-1]
    )
    out = method.training_step(labeled, unlabeled, step=0)

    # Recompute every term from the recorded teacher logits, inputs and dropped features.
    (x_l, kw_l), (x_s, kw_s) = record["inputs"]
    assert torch.equal(x_l, labeled["image"]) and kw_l == {}
    assert kw_s["feature_transform"] is spy_drop
    net = method.student
    logits_l = net(x_l)["logits"]
    logits_s = net(x_s, feature_transform=lambda _: record["dropped"])["logits"]
    prob = torch.softmax(record["teacher"], dim=1)
    conf, label = prob.max(dim=1)
    valid = unlabeled["valid"]

    def nll(logits, target):  # -log softmax of the target class, per pixel
        return -torch.log_softmax(logits, dim=1).gather(1, target[:, None].clamp(min=0))[:, 0]

    mask_l = labeled["mask"] != IGNORE
    loss_x = nll(logits_l, labeled["mask"] * mask_l)[mask_l].mean()
    terms = []
    for view, box in enumerate(boxes):
        # Inside the box, the partner B - 1 - i: the batch reversed.
        y, c, v = (torch.where(box, t.flip(0), t) for t in (label, conf, valid))
        keep = (c >= 0.4) & v
        assert 0 < keep.float().mean() < 1  # the threshold drops some pixels, keeps others
        terms.append((nll(logits_s[4 * view : 4 * view + 4], y) * keep).sum() / v.sum())
    assert len(boxes) == 2 and not torch.equal(boxes[0], boxes[1])  # a box per view
    expected = (loss_x + (terms[0] + terms[1]) / 2) / 2
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["loss_s1"], terms[0].detach())
    assert out["loss_sup"].item() == pytest.approx(loss_x.item(), rel=1e-6)


def test_pseudo_labels_come_from_the_eval_mode_teacher_of_the_weak_view():
    method, _ = build()
    seen = []
    method.teacher.network.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, args[0]))
    )
    labeled, unlabeled = batches(b=4)
    method.training_step(labeled, unlabeled, step=0)
    assert len(seen) == 1
    training, images = seen[0]
    assert not training and torch.equal(images, unlabeled["image"])


def test_strong_pass_drops_complementary_channels_of_the_two_views(monkeypatch):
    method, _ = build()
    calls = []

    def spy(images, channels, unmasked, generator=None):
        calls.append(complementary_channel_masks(images, channels, unmasked, generator))
        return calls[-1]

    monkeypatch.setattr(dropout_module, "complementary_channel_masks", spy)
    maps = []
    hook = method.student.projects[0].register_forward_pre_hook(lambda m, a: maps.append(a[0]))
    labeled, unlabeled = batches(b=4)
    method.training_step(labeled, unlabeled, step=0)
    hook.remove()
    assert len(calls) == 1  # the strong pass only; the labelled pass is clean
    first, second = calls[0]
    assert first.shape == (4, 8)  # (B unlabelled images, encoder width)
    assert maps[0].shape[0] == 4 and maps[1].shape[0] == 8  # labelled pass, then 2 x 4 views
    # The decoder's input: exactly the channels the masks drop are zero, view by view.
    zero = (maps[1] == 0).all(dim=3).all(dim=2)
    assert torch.equal(zero, torch.cat([first, second]) == 0) and zero.any()
    assert not (maps[0] == 0).all(dim=3).all(dim=2).any()


def test_accumulated_micro_batches_equal_the_full_batch(monkeypatch):
    """Without the draws that are per micro-batch by design (the dropout's masks and
    unmasked half, the reversed partner), two micro-batches of 2 give the gradient of one
    batch of 4, as the trainer accumulates them (each loss / 2)."""
    extra = ("method.comp_drop=false", "method.mix_prob=0", "method.confidence_threshold=0.4")
    grads = []
    for chunks in (1, 2):
        method, cfg = build(*extra)
        # Photometric draws change every call; with no change the views are exact copies.
        method.photometric = PhotometricAugment(
            cfg.data.mean, cfg.data.std, jitter_prob=0, grayscale_prob=0, blur_prob=0
        )
        labeled, unlabeled = batches(b=4)
        for i in range(chunks):
            rows = slice(4 // chunks * i, 4 // chunks * (i + 1))
            lab = {k: v[rows] for k, v in labeled.items()}
            unl = {k: v[rows] for k, v in unlabeled.items()}
            (method.training_step(lab, unl, step=0)["loss"] / chunks).backward()
        grads.append([p.grad.clone() for p in method.student.parameters()])
    for full, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-7)


def test_the_unmasked_half_is_drawn_per_micro_batch(monkeypatch):
    method, _ = build()
    counts = []

    def spy(images, channels, unmasked, generator=None):
        masks = complementary_channel_masks(images, channels, unmasked, generator)
        counts.append((images, int((masks[0] == 1).all(dim=1).sum())))
        return masks

    monkeypatch.setattr(dropout_module, "complementary_channel_masks", spy)
    labeled, unlabeled = batches(b=8)
    for rows in (slice(0, 4), slice(4, 8)):  # a total batch of 8 in two micro-batches
        lab = {k: v[rows] for k, v in labeled.items()}
        method.training_step(lab, {k: v[rows] for k, v in unlabeled.items()}, step=0)
    assert counts == [(4, 2), (4, 2)]  # as on the release's GPUs: 2 of each 4 untouched


def test_step_runs_under_bf16_autocast():
    method, _ = build()
    labeled, unlabeled = batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(labeled, unlabeled, step=0)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


# ---- two processes on gloo ---------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, args: list[str], out) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from protoseg.config import load_config
    from protoseg.distributed import cleanup
    from protoseg.engine.trainer import Trainer

    try:
        trainer = Trainer(load_config("synthetic/base.yaml", args))
        before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
        trainer.fit()
        after = trainer.method.state_dict()
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        torch.save({"state": after, "moved": moved}, out / f"rank{rank}.pt")
    finally:
        cleanup()


@pytest.mark.slow
def test_ranks_stay_identical_under_ddp_with_accumulation(synthetic_root, tmp_path):
    """Two gloo ranks, each accumulating two micro-batches, with the dropout inside the DDP
    forward: student and teacher end equal on both ranks, and both moved."""
    import socket

    import torch.multiprocessing as mp
    from helpers import METHOD_OVERRIDES, tiny_overrides

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "method.name=unimatch_v2",
        *tiny_overrides(
            synthetic_root, tmp_path / "run", "train.iterations=2", method="unimatch_v2"
        ),
        # A total batch of 8 over 2 ranks: 4 per rank, as 2 accumulated micro-batches of 2.
        "train.batch_size=8",
        "train.max_device_batch=2",
        "method.confidence_threshold=0",
        *METHOD_OVERRIDES["unimatch_v2"],
    ]
    mp.start_processes(
        _ddp_worker, args=(2, port, args, tmp_path), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert any(k.startswith("student.blocks.") for k in ranks[0]["moved"])
    assert any(k.startswith("teacher.") for k in ranks[0]["moved"])
    for key, value in ranks[0]["state"].items():
        assert torch.allclose(value, ranks[1]["state"][key], atol=1e-6), key
