"""Every registered method passes the contract; each method's defining mechanism is pinned."""

from __future__ import annotations

import pytest
import torch
from method_contract import IGNORE, NUM_CLASSES, MethodContract, batches

from protoseg.components import InitContext
from protoseg.methods import METHODS

SELF_TRAINING = ("method.warmup_epochs=0", "method.mix_prob=1.0", "method.confidence_threshold=0")
WARMUP = ("method.warmup_epochs=1",)


class TestSupervised(MethodContract):
    name = "supervised"


class TestMeanTeacher(MethodContract):
    name, overrides, warmup = "mean_teacher", ("method.warmup_epochs=0",), WARMUP


class TestCutMixSeg(MethodContract):
    name, overrides, warmup = "cutmix_seg", SELF_TRAINING, WARMUP


class TestPCR(MethodContract):
    name, overrides, warmup = "pcr", (*SELF_TRAINING, "method.prototypes.sample_grid=8"), WARMUP


def test_every_registered_method_has_a_contract_test():
    tested = {cls.name for cls in MethodContract.__subclasses__()}
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
