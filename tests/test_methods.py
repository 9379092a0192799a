"""Every registered method passes the contract; each method's defining mechanism is pinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feature_transform_stand_in import STAND_IN
from method_contract import IGNORE, NUM_CLASSES, MethodContract, batches

from protoseg.components import InitContext, cutmix_boxes, masked_cross_entropy, pixel_entropy
from protoseg.config import ConfigError
from protoseg.engine.optim import build_optimizer
from protoseg.methods import METHODS, fixmatch, unimatch
from protoseg.methods import cps as cps_module
from protoseg.methods import u2pl as u2pl_module

SELF_TRAINING = ("method.warmup_epochs=0", "method.mix_prob=1.0", "method.confidence_threshold=0")
WARMUP = ("method.warmup_epochs=1",)
# Weak-to-strong methods: a CutMix box in every image, every pixel confident.
WEAK_STRONG = ("method.mix_prob=1.0", "method.confidence_threshold=0")
# Queues and queries sized to the tiny batch; low_rank 1 because 3 classes leave no class at
# rank 3 (the release's low_rank), so no unlabelled pixel could be a negative.
U2PL_TINY = (
    "method.warmup_epochs=0",
    "method.mix_prob=1.0",
    "method.contrast.low_rank=1",
    "method.contrast.dim=16",
    "method.contrast.queue_size=64",
    "method.contrast.first_class_queue_size=96",
    "method.contrast.num_queries=32",
    "method.contrast.num_negatives=8",
)


class TestSupervised(MethodContract):
    name = "supervised"


class TestMeanTeacher(MethodContract):
    name, overrides, warmup = "mean_teacher", ("method.warmup_epochs=0",), WARMUP


class TestCutMixSeg(MethodContract):
    name, overrides, warmup = "cutmix_seg", SELF_TRAINING, WARMUP


class TestPCR(MethodContract):
    name, overrides, warmup = "pcr", (*SELF_TRAINING, "method.prototypes.sample_grid=8"), WARMUP


class TestU2PL(MethodContract):
    name, overrides, warmup = "u2pl", U2PL_TINY, WARMUP


class TestCPS(MethodContract):
    name, warmup = "cps", WARMUP


class TestFixMatch(MethodContract):
    name, overrides, warmup = "fixmatch", WEAK_STRONG, WARMUP


class TestFixMatchEMA(MethodContract):
    name, overrides, warmup = "fixmatch", (*WEAK_STRONG, "method.teacher=ema"), WARMUP


class TestUniMatch(MethodContract):
    name, overrides, warmup = "unimatch", WEAK_STRONG, WARMUP


# UniMatch V2 drops channels between encoder and decoder: a network with that interface.
UNIMATCH_V2 = (f"model.name={STAND_IN}", *WEAK_STRONG)


class TestUniMatchV2(MethodContract):
    name, overrides, warmup = "unimatch_v2", UNIMATCH_V2, WARMUP


PLUG_IN = ("method.warmup_epochs=0", "method.prototypes.sample_grid=8")


class TestFixMatchPCR(MethodContract):
    name, overrides, warmup = "fixmatch+pcr", (*WEAK_STRONG, *PLUG_IN), WARMUP


class TestUniMatchPCR(MethodContract):
    name, overrides, warmup = "unimatch+pcr", (*WEAK_STRONG, *PLUG_IN), WARMUP


class TestU2PLPCR(MethodContract):
    name, overrides, warmup = "u2pl+pcr", (*U2PL_TINY, *PLUG_IN), WARMUP


class TestCPSPCR(MethodContract):
    name, overrides, warmup = "cps+pcr", PLUG_IN, WARMUP


class TestUniMatchV2PCR(MethodContract):
    name, overrides, warmup = "unimatch_v2+pcr", (*UNIMATCH_V2, *PLUG_IN), WARMUP


# How many unlabelled views of the batch feed each plug-in's branch.
PLUG_IN_VIEWS = {
    TestPCR: 1,
    TestFixMatchPCR: 1,
    TestUniMatchPCR: 2,
    TestU2PLPCR: 1,
    TestCPSPCR: 1,
    TestUniMatchV2PCR: 2,
}


@pytest.mark.parametrize("contract", list(PLUG_IN_VIEWS))
def test_pcr_plugs_into_every_base_method(contract, monkeypatch):
    method, _ = contract().build()
    # The teacher's heads; unimatch_v2+pcr also evaluates its student (a third head).
    assert method.heads[:2] == ("linear", "prototype")
    assert method.heads[2:] == (("student",) if contract is TestUniMatchV2PCR else ())
    labeled, unlabeled = batches()
    seen = {}
    losses = method.prototype_losses

    def spy(inputs):
        seen["unlabelled_images"] = inputs.features_u.shape[0]
        return losses(inputs)

    monkeypatch.setattr(method, "prototype_losses", spy)
    before = method.branch.bank.prototypes.clone()
    out = method.training_step(labeled, unlabeled, step=0)
    assert out["loss_proto_unsup"].item() > 0 and out["loss_proto_sup"].item() > 0
    # PCR's (CutMix-Seg's) branch sees its mixed view, FixMatch's its strong view,
    # UniMatch's both strong views, U2PL's and CPS's their mixed view.
    assert seen["unlabelled_images"] == PLUG_IN_VIEWS[contract] * unlabeled["image"].shape[0]
    method.after_optimizer_step(0)
    assert not torch.equal(method.branch.bank.prototypes, before)
    assert "prototype" in method.deploy()["heads"]


@pytest.mark.parametrize("name", ["fixmatch+pcr", "unimatch+pcr", "u2pl+pcr", "cps+pcr"])
def test_prototype_only_ablation_is_refused_where_the_step_lacks_it(name):
    contract = next(c for c in PLUG_IN_VIEWS if c.name == name)
    with pytest.raises(ValueError, match=r"method.linear_head=false.*pcr"):
        contract().build("method.linear_head=false")


def test_every_registered_method_has_a_contract_test():
    # This file's contracts (test_adding_a_method.py adds its example's, registered only
    # while its tests run).
    tested = {c.name for c in MethodContract.__subclasses__() if c.__module__ == __name__}
    assert tested == set(METHODS)


# ---- what makes each method itself -----------------------------------------------------------
def test_mean_teacher_targets_are_the_teachers_softmax():
    method, _ = TestMeanTeacher().build("method.noise_std=0")
    labeled, unlabeled = batches()
    labeled["mask"].fill_(IGNORE)
    method.teacher.network.load_state_dict(method.student.state_dict())
    method.teacher.bn_mode = "copy"  # no BN refresh: teacher == student in eval mode
    method.eval()
    out = method.training_step(labeled, unlabeled, step=0)
    # With identical networks in the same mode and no noise the consistency is zero.
    assert out["loss_consistency"].item() == pytest.approx(0.0, abs=1e-10)


def test_cutmix_seg_learns_from_the_teachers_mixed_pseudo_labels(monkeypatch):
    method, _ = TestCutMixSeg().build()
    labeled, unlabeled = batches()
    seen = {}
    predict = method.teacher.predict

    def spy(images):
        seen["teacher_input"] = images
        return predict(images)

    monkeypatch.setattr(method.teacher, "predict", spy)
    out = method.training_step(labeled, unlabeled, step=0)
    # The teacher sees the weak (unmixed) view; every pixel is confident at tau = 0.
    assert torch.equal(seen["teacher_input"], unlabeled["image"])
    assert out["confident_fraction"].item() == pytest.approx(1.0)
    assert out["loss_unsup"].item() > 0


TEACHER_METHODS = (TestMeanTeacher, TestCutMixSeg, TestPCR)


@pytest.mark.parametrize("contract", TEACHER_METHODS)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # (train mode?, images) of each teacher pass, 2 labelled + 2 unlabelled images.
        ("forward", [(True, 2), (False, 2)]),  # refresh on the weak view, then pseudo-label
        ("student_batch", [(False, 2), (True, 4)]),  # pseudo-label, then [labelled; mixed]
        ("copy", [(False, 2)]),
    ],
)
def test_teacher_bn_refresh_runs_on_the_configured_batch(contract, mode, expected):
    method, _ = contract().build(f"method.teacher_bn={mode}")
    calls = []
    method.teacher.network.register_forward_pre_hook(
        lambda module, args: calls.append((module.training, int(args[0].shape[0])))
    )
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)
    assert calls == expected


@pytest.mark.parametrize("contract", TEACHER_METHODS)
def test_ema_start_after_epoch_keeps_the_teacher_on_the_student_for_an_epoch(contract):
    method, _ = contract().build("method.ema_start=after_epoch")  # 10 steps per epoch
    s_param = next(method.student.parameters())
    t_param = next(method.teacher.network.parameters())
    for step in (0, 5, 9):  # no warm-up here: the first semi-supervised epoch
        with torch.no_grad():
            s_param.add_(1.0)
        method.after_optimizer_step(step)
        assert torch.equal(t_param, s_param)
    with torch.no_grad():
        s_param.add_(1.0)
    before = t_param.clone()
    method.after_optimizer_step(10)  # then the EMA: decay min(1 - 1/11, 0.99)
    assert torch.allclose(t_param, before + (s_param - before) / 11, atol=1e-6)


def test_pcr_updates_the_bank_and_trains_the_prototype_predictor():
    method, _ = TestPCR().build()
    before = method.branch.bank.prototypes.clone()
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=0)
    assert {"loss_sup", "loss_unsup", "loss_proto_sup", "loss_proto_unsup"} <= set(out)
    assert out["loss_proto_unsup"].item() > 0
    assert out["prototypes_updated"] > 0
    # The bank moves once per optimiser step, not per (micro-)batch.
    assert torch.equal(method.branch.bank.prototypes, before)
    method.after_optimizer_step(0)
    assert not torch.equal(method.branch.bank.prototypes, before)


def test_pcr_bank_is_the_same_with_gradient_accumulation():
    """Two micro-batches of 2 move the bank as one batch of 4 does (issue: accumulation)."""
    settings = ("method.mix_prob=0", "method.teacher_bn=copy", "method.prototypes.sample_grid=0")
    labeled, unlabeled = batches(b=4)
    banks = []
    for splits in ((slice(0, 4),), (slice(0, 2), slice(2, 4))):
        method, _ = TestPCR().build(*settings)
        method.eval()  # BN and dropout see each image alike whatever the split
        for part in splits:
            method.training_step(
                {k: v[part] for k, v in labeled.items()},
                {k: v[part] for k, v in unlabeled.items()},
                step=0,
            )
        method.after_optimizer_step(0)
        banks.append(method.branch.bank.prototypes.clone())
    before = TestPCR().build(*settings)[0].branch.bank.prototypes
    assert not torch.equal(banks[0], before)
    assert torch.allclose(banks[0], banks[1], atol=1e-6)


def test_pcr_ablations():
    labeled, unlabeled = batches()
    frozen, _ = TestPCR().build("method.prototypes.update=false")
    before = frozen.branch.bank.prototypes.clone()
    out = frozen.training_step(labeled, unlabeled, step=0)
    assert torch.equal(frozen.branch.bank.prototypes, before) and "loss_proto_unsup" in out

    linear_only, _ = TestPCR().build(
        "method.prototypes.train_predictor=false", "method.prototypes.update=false"
    )
    out = linear_only.training_step(labeled, unlabeled, step=0)
    assert "loss_proto_sup" not in out and "loss_unsup" in out

    proto_only, _ = TestPCR().build("method.linear_head=false")
    assert proto_only.find_unused_parameters and proto_only.heads[0] == "prototype"
    out = proto_only.training_step(labeled, unlabeled, step=0)
    assert "loss_unsup" not in out and "loss_proto_unsup" in out
    out["loss"].backward()
    classifier_last = list(proto_only.student.classifier.parameters())[-1]
    assert classifier_last.grad is None  # the linear classifier is not trained


def test_pcr_refuses_to_train_without_a_bank():
    method, _ = TestPCR().build()
    method.branch.bank.initialized.fill_(False)
    labeled, unlabeled = batches()
    with pytest.raises(RuntimeError, match="not initialised"):
        method.training_step(labeled, unlabeled, step=0)
    assert method.needs_init(0)
    method.initialize(InitContext([labeled], torch.device("cpu"), seed=0))
    assert not method.needs_init(0)


def test_pcr_loads_a_saved_bank(tmp_path):
    source, _ = TestPCR().build()
    path = tmp_path / "bank.pt"
    torch.save(source.branch.bank.state_dict(), path)
    target, _ = TestPCR().build(f"method.prototypes.init_bank={path}")
    assert torch.equal(target.branch.bank.prototypes, source.branch.bank.prototypes)
    torch.save(torch.zeros(2, 2), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected prototypes of shape"):
        target.branch.load_bank(tmp_path / "bad.pt")


def test_pcr_deploys_its_bank_as_the_prototype_head():
    method, _ = TestPCR().build()
    spec = method.deploy()["heads"]["prototype"]
    assert spec["options"]["num_classes"] == NUM_CLASSES
    assert torch.equal(spec["state"]["prototypes"], method.branch.bank.prototypes)


# ---- U2PL ----------------------------------------------------------------------------------
def _spy_u2pl(method, monkeypatch) -> dict:
    """Record the teacher's train-mode logits and what the CE and contrast receive."""
    seen: dict = {}
    teacher_forward = method.teacher_forward

    def teacher_spy(images, train):
        out = teacher_forward(images, train)
        if train:
            seen["teacher_logits"] = out["logits"]
        return out

    ce = u2pl_module.reliable_cross_entropy

    def ce_spy(logits, target, reliable, valid):
        seen["reliable"] = reliable
        return ce(logits, target, reliable, valid)

    contrast = u2pl_module.contrastive_loss

    def contrast_spy(rep, rep_teacher, prob, labels, reliable, unreliable, *rest):
        seen["contrast"] = (labels, reliable, unreliable)
        return contrast(rep, rep_teacher, prob, labels, reliable, unreliable, *rest)

    monkeypatch.setattr(method, "teacher_forward", teacher_spy)
    monkeypatch.setattr(u2pl_module, "reliable_cross_entropy", ce_spy)
    monkeypatch.setattr(u2pl_module, "contrastive_loss", contrast_spy)
    return seen


@pytest.mark.parametrize(("step", "unreliable_percent"), [(0, 20.0), (55, 10.0)])
def test_u2pl_ce_drops_exactly_the_pixels_above_the_annealed_entropy_percentile(
    monkeypatch, step, unreliable_percent
):
    method, _ = TestU2PL().build()
    method.total_steps = 100  # 10 epochs of 10 steps: step 55 is in epoch 5 of 10
    seen = _spy_u2pl(method, monkeypatch)
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=step)
    # The entropy of the teacher's train-mode prediction of the mixed view (rows after the
    # labelled ones); (100 - drop_percent) * (1 - epoch / epochs) percent is unreliable.
    entropy = pixel_entropy(seen["teacher_logits"][labeled["image"].shape[0] :])
    threshold = np.percentile(entropy.numpy(), 100.0 - unreliable_percent)
    assert torch.equal(seen["reliable"], entropy < torch.tensor(threshold, dtype=entropy.dtype))
    share = 1.0 - seen["reliable"].float().mean().item()
    assert share == pytest.approx(unreliable_percent / 100.0, abs=0.01)


def test_u2pl_unreliable_pixels_are_contrast_negatives_only(monkeypatch):
    method, _ = TestU2PL().build()
    seen = _spy_u2pl(method, monkeypatch)
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)
    labels, reliable, unreliable = seen["contrast"]
    n = labeled["image"].shape[0]
    # Unlabelled rows: the two sets are the lowest and highest 20 % of the entropies (the
    # release's low_entropy_threshold at the start), disjoint; labelled pixels are in both.
    assert not (reliable[n:] & unreliable[n:]).any()
    assert unreliable[n:].float().mean().item() == pytest.approx(0.2, abs=0.05)
    assert torch.equal(reliable[:n], labels[:n] != IGNORE)
    assert torch.equal(unreliable[:n], reliable[:n])


def test_u2pl_queues_survive_a_state_dict_round_trip():
    first, _ = TestU2PL().build()
    labeled, unlabeled = batches()
    for step in range(3):
        first.training_step(labeled, unlabeled, step=step)
    assert first.queues.length.sum() > 0
    state = first.state_dict()
    assert {"queues.keys", "queues.length", "queues.head"} <= set(state)
    second, _ = TestU2PL().build(seed=5)
    second.load_state_dict(state)
    for c in range(NUM_CLASSES):
        assert torch.equal(second.queues.queue(c), first.queues.queue(c))


def test_u2pl_trains_its_representation_head_and_deploys_the_bare_teacher():
    method, cfg = TestU2PL().build()
    labeled, unlabeled = batches()
    method.training_step(labeled, unlabeled, step=0)["loss"].backward()
    head = list(method.student.representation.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head[-2:])
    optimiser = build_optimizer(method.student, cfg.optim)
    decoder = next(g for g in optimiser.param_groups if g["name"] == "decoder")
    assert {id(p) for p in head} <= {id(p) for p in decoder["params"]}
    # The model file holds the network alone, under the names every other method uses.
    network = method.deploy()["network"]
    assert network is method.teacher.network.network
    assert set(network.state_dict()) == set(method.student.network.state_dict())


def test_u2pl_teacher_is_the_student_for_a_copy_epoch_then_an_ema():
    method, _ = TestU2PL().build()  # 10 steps per epoch, no warm-up
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(9)
    student = method.student.state_dict()
    teacher = method.teacher.network.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in student.items())
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(10)
    # The release's decay, min(1 - 1/(t + 1), 0.99) with t counted from the warm-up's end.
    decay = 1.0 - 1.0 / 11.0
    name, param = next(iter(method.student.named_parameters()))
    assert torch.allclose(method.teacher.network.state_dict()[name], param - decay)


def test_u2pl_plug_in_learns_exactly_the_reliable_pixels(monkeypatch):
    method, _ = TestU2PLPCR().build()
    seen = _spy_u2pl(method, monkeypatch)
    branch_losses = method.branch.losses

    def branch_spy(features_l, features_u, y_l, pseudo_u, valid_u, *rest):
        seen["pseudo"] = pseudo_u
        return branch_losses(features_l, features_u, y_l, pseudo_u, valid_u, *rest)

    monkeypatch.setattr(method.branch, "losses", branch_spy)
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=0)
    # The branch's pseudo-labels are set exactly where U2PL's CE trusts the teacher.
    assert torch.equal(seen["pseudo"] != IGNORE, seen["reliable"])
    assert 0 < seen["reliable"].float().mean().item() < 1
    assert out["loss_proto_unsup"].item() > 0
    before = method.branch.bank.prototypes.clone()
    method.after_optimizer_step(0)
    assert not torch.equal(method.branch.bank.prototypes, before)


def _left_half(b: int, h: int, w: int) -> torch.Tensor:
    """Box masks that paste the left half of every image (CutMix made predictable)."""
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[..., : w // 2] = True
    return mask


# ---- CPS -----------------------------------------------------------------------------------
def _spy_cps(monkeypatch, mask=None) -> list:
    """Record every (logits, target) of the cross-supervision CE; optionally fix the masks."""
    calls = []
    ce = cps_module.masked_cross_entropy

    def ce_spy(logits, target, keep, valid):
        calls.append((logits.detach(), target))
        return ce(logits, target, keep, valid)

    monkeypatch.setattr(cps_module, "masked_cross_entropy", ce_spy)
    if mask is not None:
        monkeypatch.setattr(cps_module, "box_masks", lambda b, h, w, *_: mask(b, h, w))
    return calls


def test_cps_networks_learn_each_others_argmax_of_the_unmixed_then_mixed_images(monkeypatch):
    method, _ = TestCPS().build("model.dropout=0")

    calls = _spy_cps(monkeypatch, _left_half)
    labeled, unlabeled = batches()
    x_l, x_u = labeled["image"], unlabeled["image"]
    left, right = method.student.left, method.student.right
    # Train-mode forwards with dropout off: BN statistics depend on the batch only, so the
    # same batches give the outputs the step sees.
    with torch.no_grad():
        label_l, label_r = (net(x_u)["logits"].argmax(1) for net in (left, right))
        mask = _left_half(*label_l.shape)
        x_m = torch.where(mask[:, None], x_u.roll(-1, 0), x_u)
        logits_l, logits_r = (net(torch.cat([x_l, x_m]))["logits"][2:] for net in (left, right))
    method.training_step(labeled, unlabeled, step=0)
    (student_l, target_l), (student_r, target_r) = calls
    mixed_l = torch.where(mask, label_l.roll(-1, 0), label_l)
    mixed_r = torch.where(mask, label_r.roll(-1, 0), label_r)
    assert torch.allclose(student_l, logits_l, atol=1e-5)
    assert torch.equal(target_l, mixed_r)  # the first network learns the second's labels
    assert torch.allclose(student_r, logits_r, atol=1e-5)
    assert torch.equal(target_r, mixed_l)
    assert not torch.equal(mixed_l, mixed_r)  # differently initialised: they disagree


def test_cps_trains_and_optimises_both_networks():
    method, cfg = TestCPS().build()
    labeled, unlabeled = batches()
    labeled["mask"].fill_(IGNORE)  # only the cross supervision is left
    method.training_step(labeled, unlabeled, step=0)["loss"].backward()
    optimiser = build_optimizer(method.student, cfg.optim)
    optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
    for network in (method.student.left, method.student.right):
        params = list(network.parameters())
        assert {id(p) for p in params} <= optimised
        assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0
    assert method.deploy()["network"] is method.student.left


def test_cps_second_network_is_built_from_another_seed():
    a, _ = TestCPS().build(seed=0)
    b, _ = TestCPS().build(seed=7)  # another first network, the same second one
    left, right = a.student.left.state_dict(), a.student.right.state_dict()
    assert left.keys() == right.keys()
    differ = [k for k in left if left[k].is_floating_point() and not torch.equal(left[k], right[k])]
    assert any(k.startswith("classifier") for k in differ)
    for k, v in b.student.right.state_dict().items():
        assert torch.equal(v, right[k]), k


@pytest.mark.parametrize("teacher", ["self", "ema"])
def test_fixmatch_pseudo_labels_never_see_the_strong_view(monkeypatch, teacher):
    labeled, unlabeled = batches()
    targets = []

    def spy(logits, target, keep, valid):
        targets.append((target, keep))
        return masked_cross_entropy(logits, target, keep, valid)

    monkeypatch.setattr(fixmatch, "masked_cross_entropy", spy)
    losses = []
    for garbage in (False, True):
        method, _ = TestFixMatch().build(f"method.teacher={teacher}")
        with torch.no_grad():  # sharper logits, so that the pseudo-labels vary over pixels
            method.deployed_network().classifier[-1].weight.mul_(100)
        if garbage:
            method.photometric = lambda images, valid: 100 * torch.randn_like(images)
        torch.manual_seed(3)
        losses.append(method.training_step(labeled, unlabeled, step=0)["loss_unsup"])
    (labels, keep), (garbage_labels, garbage_keep) = targets
    assert torch.equal(labels, garbage_labels) and torch.equal(keep, garbage_keep)
    assert labels.unique().numel() > 1
    assert losses[0] != losses[1]  # the garbage did reach the student


def test_fixmatch_takes_pseudo_labels_from_the_chosen_teacher(monkeypatch):
    labeled, unlabeled = batches()
    own, _ = TestFixMatch().build()
    inputs = []
    run = own.run_student
    monkeypatch.setattr(own, "run_student", lambda x, **kw: inputs.append(x) or run(x, **kw))
    out = own.training_step(labeled, unlabeled, step=0)
    # UniMatch's FixMatch: one train-mode student pass over labelled and weak images.
    assert torch.equal(inputs[0], torch.cat([labeled["image"], unlabeled["image"]]))
    assert len(inputs) == 2 and own.deploy()["network"] is own.student
    assert out["loss"].item() == pytest.approx((out["loss_sup"] + out["loss_unsup"]).item() / 2)

    ema, _ = TestFixMatchEMA().build()
    seen = []
    predict = ema.teacher.predict
    monkeypatch.setattr(ema.teacher, "predict", lambda x: seen.append(x) or predict(x))
    ema.training_step(labeled, unlabeled, step=0)
    assert torch.equal(seen[0], unlabeled["image"])
    assert ema.deploy()["network"] is ema.teacher.network


def test_unimatch_strong_views_get_their_own_boxes_and_colours(monkeypatch):
    method, _ = TestUniMatch().build()
    boxes, colours, inputs = [], [], []

    def box_spy(*args):
        boxes.append(cutmix_boxes(*args))
        return boxes[-1]

    photometric = method.photometric

    def colour_spy(images, valid):
        colours.append((images, photometric(images, valid)))
        return colours[-1][1]

    run = method.run_student
    monkeypatch.setattr(unimatch, "cutmix_boxes", box_spy)
    monkeypatch.setattr(method, "photometric", colour_spy)
    monkeypatch.setattr(method, "run_student", lambda x, **kw: inputs.append(x) or run(x, **kw))
    labeled, unlabeled = batches(b=4)
    method.training_step(labeled, unlabeled, step=0)
    assert len(boxes) == len(colours) == 2 and len(inputs) == 2
    assert all(b.flatten(1).any(dim=1).all() for b in boxes)  # mix_prob 1: a box per image
    assert not torch.equal(boxes[0], boxes[1])
    (weak_1, strong_1), (weak_2, strong_2) = colours
    assert weak_1 is unlabeled["image"] and weak_2 is unlabeled["image"]
    assert not torch.equal(strong_1, strong_2)
    # The student's second pass sees both views, each with the partner's pixels in its box.
    mixed = [torch.where(b[:, None], s.roll(-1, 0), s) for b, (_, s) in zip(boxes, colours)]
    assert torch.equal(inputs[1], torch.cat(mixed))


def test_unimatch_feature_stream_sees_dropped_channels(monkeypatch):
    method, _ = TestUniMatch().build()
    calls = []
    drop = method.drop_channels

    def spy(features):
        calls.append((features, drop(features)))
        return calls[-1][1]

    monkeypatch.setattr(method, "drop_channels", spy)
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=0)
    assert len(calls) == 2  # the low-level and the last encoder map
    for features, dropped in calls:
        assert features.shape[0] == 4  # the labelled and the weak images of the shared pass
        flat, flat_dropped = features.flatten(2), dropped.flatten(2)
        live = flat.abs().amax(dim=2) > 0
        zeroed = (flat_dropped == 0).all(dim=2) & live
        assert 0.3 < zeroed[live].float().mean() < 0.7  # p = 0.5
        kept = ~zeroed & live
        torch.testing.assert_close(flat_dropped[kept], 2 * flat[kept])  # scaled by 1/(1-p)
    assert out["loss_fp"] > 0
    expected = (out["loss_sup"] + 0.5 * out["loss_unsup"] + 0.5 * out["loss_fp"]) / 2
    assert out["loss"].item() == pytest.approx(expected.item())


def test_weak_to_strong_settings_are_checked():
    with pytest.raises(ConfigError, match="method.teacher"):
        TestFixMatch().build("method.teacher=mean")
    with pytest.raises(ConfigError, match="method.mix_box"):
        TestUniMatch().build("method.mix_box=circle")
    with pytest.raises(ConfigError, match="method.fp_dropout"):
        TestUniMatch().build("method.fp_dropout=1.0")


def test_cps_plug_in_sits_on_the_first_network_and_learns_the_seconds_labels(monkeypatch):
    method, _ = TestCPSPCR().build("model.dropout=0")

    calls = _spy_cps(monkeypatch, _left_half)
    seen = {}
    branch_losses = method.branch.losses

    def branch_spy(features_l, features_u, y_l, pseudo_u, valid_u, *rest):
        seen["features_u"], seen["pseudo"] = features_u.detach(), pseudo_u
        return branch_losses(features_l, features_u, y_l, pseudo_u, valid_u, *rest)

    monkeypatch.setattr(method.branch, "losses", branch_spy)
    labeled, unlabeled = batches()
    x_l, x_u = labeled["image"], unlabeled["image"]
    x_m = torch.where(_left_half(*x_u.shape[:1], *x_u.shape[2:])[:, None], x_u.roll(-1, 0), x_u)
    with torch.no_grad():  # train-mode BN on the step's batch, dropout off: the step's outputs
        pair = (method.student.left, method.student.right)
        first, second = (net(torch.cat([x_l, x_m]))["features"][2:] for net in pair)
    method.training_step(labeled, unlabeled, step=0)
    (_, target_first), _ = calls
    # Every valid pixel carries the label the first network learns: the second's argmax.
    assert torch.equal(seen["pseudo"], target_first)
    # The features are the first network's (the deployed one, whose bank ships).
    assert torch.allclose(seen["features_u"], first, atol=1e-5)
    assert not torch.allclose(seen["features_u"], second, atol=1e-3)
    method.after_optimizer_step(0)
    assert method.deploy()["network"] is method.student.left
