"""The training engine end to end on the synthetic set: learning, exact resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import poison_step, tiny_overrides

from protoseg.config import OptimConfig, load_config, shipped_config_dir
from protoseg.data import build_dataset, build_eval_loader, eval_transform
from protoseg.engine.checkpoint import latest_checkpoint, list_checkpoints
from protoseg.engine.optim import build_optimizer, poly_factor
from protoseg.engine.trainer import NonFiniteLossError, Trainer
from protoseg.files import CheckpointError
from protoseg.methods import METHODS


def tiny_config(root, out, method="supervised", *extra):
    overrides = tiny_overrides(root, out, *extra, method=method)
    if not (shipped_config_dir() / "synthetic" / f"{method}.yaml").is_file():
        # A method without a synthetic recipe (its network is not the synthetic DeepLab):
        # the base recipe, and the network METHOD_OVERRIDES names.
        return load_config("synthetic/base.yaml", [f"method.name={method}", *overrides])
    return load_config(f"synthetic/{method}.yaml", overrides)


def test_poly_schedule_values():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    assert poly_factor(150, 100, 0.9) == 0.0


def test_optimizer_steps_equal_the_per_parameter_loop():
    # build_optimizer takes the multi-tensor path on every device; on a CPU it must still give
    # PyTorch's per-parameter SGD values bit for bit, or every recorded result would move.
    def trained(multi_tensor: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        net.add_module("head", torch.nn.Conv2d(8, 4, 1))
        cfg = OptimConfig(lr=0.05, weight_decay=1e-3, momentum=0.9, decoder_lr_mult=1.0)
        if multi_tensor:
            optimiser = build_optimizer(net, cfg)
        else:
            optimiser = torch.optim.SGD(
                net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False
            )
        inputs = torch.randn(6, 2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
        for batch in inputs:
            optimiser.zero_grad()
            net(batch).square().mean().backward()
            optimiser.step()
        return {k: v.clone() for k, v in net.state_dict().items()}

    multi, loop = trained(True), trained(False)
    assert all(torch.equal(multi[k], loop[k]) for k in loop)


# End to end (tens of seconds): in `make test-all`, not the default suite.
@pytest.mark.slow
def test_supervised_training_beats_chance(synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root, tmp_path / "run", "supervised", "train.iterations=100", "optim.lr=0.03"
    )
    result = Trainer(cfg).fit()
    miou = result.final["linear"].miou
    # Chance: everything predicted as the majority class (background) on the same split.
    val = build_dataset(cfg.data, "val", eval_transform(cfg.data))
    counts = torch.zeros(cfg.data.num_classes)
    for batch in build_eval_loader(val):
        mask = batch["mask"][batch["mask"] != 255]
        counts += torch.bincount(mask, minlength=cfg.data.num_classes)
    chance = 100 * (counts[0] / counts.sum()).item() / cfg.data.num_classes
    assert miou > chance + 10, (miou, chance)
    out = tmp_path / "run"
    for name in ("model.pt", "best.pt", "config.yaml", "eval_final_linear.json", "history.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "eval_final_linear.json").read_text())["miou"] == pytest.approx(miou)
    assert list((out / "tensorboard").iterdir())


# Every registered method resumes exactly; two of them in the default suite, the others
# (a few seconds each) in `make test-all`.
FAST_RESUME = ("supervised", "pcr")


@pytest.mark.parametrize(
    "method",
    [m if m in FAST_RESUME else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHODS)],
)
def test_resume_matches_an_uninterrupted_run(synthetic_root, tmp_path, method):
    extra = ["train.iterations=6", "train.checkpoint_every=3", "train.eval_every=0"]
    straight = Trainer(tiny_config(synthetic_root, tmp_path / "a", method, *extra))
    straight.fit()
    first = Trainer(tiny_config(synthetic_root, tmp_path / "b", method, *extra))
    first.fit(max_steps=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_0000003.pt"]
    resumed = Trainer(tiny_config(synthetic_root, tmp_path / "b", method, *extra))
    resumed.fit()
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The checkpoint holds the whole method state (PCR's bank, U2PL's queues), as plain data.
    ckpt = torch.load(latest_checkpoint(tmp_path / "b" / "checkpoints"), weights_only=True)
    for key, value in ckpt["method"].items():
        assert torch.equal(value, b[key]), key


def test_resume_refuses_a_checkpoint_of_another_recipe(synthetic_root, tmp_path):
    extra = ["train.iterations=4", "train.checkpoint_every=2"]
    first = tiny_config(synthetic_root, tmp_path / "r", "supervised", *extra)
    Trainer(first).fit(max_steps=2)
    changed = tiny_config(synthetic_root, tmp_path / "r", "supervised", *extra, "optim.lr=0.5")
    with pytest.raises(CheckpointError, match=r"step_0000002.pt was written by a different") as e:
        Trainer(changed).fit()
    assert f"optim.lr: {first.optim.lr!r} -> 0.5" in str(e.value)
    assert "new train.out_dir" in str(e.value)
    # Cadence, logging and device keys may change between a run and its resume.
    free = tiny_config(synthetic_root, tmp_path / "r", "supervised", *extra, "train.log_every=1")
    assert Trainer(free).fit().steps == 4


def test_gradient_accumulation_matches_the_full_batch_without_bn(synthetic_root, tmp_path):
    """max_device_batch splits a total batch; with BN in eval-like mode the update is equal."""
    # Rounding differences of the two summation orders scale with the step size.
    extra = ["train.iterations=2", "model.dropout=0", "optim.lr=0.01"]
    full = Trainer(tiny_config(synthetic_root, tmp_path / "a", "supervised", *extra))
    acc = Trainer(
        tiny_config(
            synthetic_root, tmp_path / "b", "supervised", *extra, "train.max_device_batch=2"
        )
    )
    assert (full.data.micro_batch, full.data.accum_steps) == (4, 1)
    assert (acc.data.micro_batch, acc.data.accum_steps) == (2, 2)
    for trainer in (full, acc):  # freeze BN statistics so micro-batches see the same norm
        for module in trainer.method.student.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
                module.train = lambda mode=True, m=module: m  # keep it in eval mode
        trainer.fit(max_steps=2)
    pa = dict(full.method.student.named_parameters())
    for name, p in acc.method.student.named_parameters():
        assert torch.allclose(p, pa[name], atol=1e-5), name


def test_nonfinite_loss_stops_with_a_clear_message(synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root,
        tmp_path / "nan",
        "supervised",
        "train.iterations=4",
        "train.checkpoint_every=1",
    )
    trainer = Trainer(cfg)
    poison_step(trainer, at_step=2, term="loss_sup")
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite .*loss_sup=nan") as err:
        trainer.fit()
    assert "step_0000002.pt" in str(err.value)  # the last good checkpoint is kept and named
    assert latest_checkpoint(tmp_path / "nan" / "checkpoints").name == "step_0000002.pt"


def test_nonfinite_loss_can_skip_the_step(synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root,
        tmp_path / "skip",
        "supervised",
        "train.iterations=3",
        "train.on_nonfinite=skip",
    )
    trainer = Trainer(cfg)
    poison_step(trainer, at_step=1)
    result = trainer.fit()
    assert result.steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.method.student.parameters())
    assert math.isfinite(result.final["linear"].miou)


PROTO_TERMS = {"loss_proto_sup", "loss_proto_unsup"}


@pytest.mark.parametrize(
    ("overrides", "logged", "absent"),
    [
        (["method.strong_aug=cutout"], {"loss_unsup", *PROTO_TERMS}, set()),
        (["method.strong_aug=classmix"], {"loss_unsup", *PROTO_TERMS}, set()),
        (["method.linear_head=false"], PROTO_TERMS, {"loss_unsup", "loss_sup"}),
        (["method.prototypes.update=false"], PROTO_TERMS, {"prototypes_updated"}),
        (["method.prototypes.train_predictor=false"], {"loss_unsup"}, PROTO_TERMS),
        (
            ["method.prototypes.update_rule=per_pixel", "method.teacher_bn=copy"],
            {"loss_unsup", "prototypes_updated", *PROTO_TERMS},
            set(),
        ),
    ],
)
def test_pcr_variants_train_through_the_engine(synthetic_root, tmp_path, overrides, logged, absent):
    cfg = tiny_config(
        synthetic_root,
        tmp_path / "v",
        "pcr",
        "train.iterations=2",
        "train.log_every=1",
        "method.mix_prob=1.0",
        "method.confidence_threshold=0",
        *overrides,
    )
    result = Trainer(cfg).fit()
    terms = set().union(*result.history)
    assert logged <= terms and not absent & terms
    # Every pixel is confident at tau = 0, so each unlabelled term is active.
    for term in logged:
        assert all(h[term] > 0 for h in result.history if term in h), term
    head = "prototype" if "method.linear_head=false" in overrides else "linear"
    assert head == next(iter(result.final)) and math.isfinite(result.final[head].miou)


@pytest.mark.parametrize("method", ["mean_teacher", "cutmix_seg"])
def test_teacher_methods_train_through_the_engine(synthetic_root, tmp_path, method):
    cfg = tiny_config(
        synthetic_root, tmp_path / method, method, "train.iterations=2", "train.log_every=1"
    )
    result = Trainer(cfg).fit()
    unlabelled = {"mean_teacher": "loss_consistency", "cutmix_seg": "loss_unsup"}[method]
    assert all(unlabelled in h for h in result.history)
    teacher, student = result.out_dir / "model.pt", Trainer(cfg).method.student
    # The deployed model is the EMA teacher: it differs from a freshly built student.
    deployed = torch.load(teacher, weights_only=True)["state_dict"]
    assert any(not torch.equal(deployed[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize(
    ("method", "extra"),
    [("fixmatch", []), ("fixmatch", ["method.teacher=ema"]), ("unimatch", [])],
)
def test_weak_to_strong_methods_train_through_the_engine(synthetic_root, tmp_path, method, extra):
    cfg = tiny_config(
        synthetic_root,
        tmp_path / method,
        method,
        "train.iterations=2",
        "train.log_every=1",
        "method.confidence_threshold=0",
        *extra,
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    terms = {"loss_sup", "loss_unsup", "confident_fraction"}
    terms |= {"loss_fp"} if method == "unimatch" else set()
    assert all(terms <= set(h) and h["loss_unsup"] > 0 for h in result.history)
    deployed = trainer.method.deploy()["network"]
    assert (deployed is trainer.method.student) == ("method.teacher=ema" not in extra)
    assert math.isfinite(result.final["linear"].miou)


def test_corrupt_checkpoint_is_reported(synthetic_root, tmp_path):
    folder = tmp_path / "c" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_0000005.pt").write_bytes(b"not a checkpoint")
    cfg = tiny_config(synthetic_root, tmp_path / "c", "supervised", "train.iterations=6")
    with pytest.raises(CheckpointError, match=r"step_0000005.pt: cannot be read.*delete it"):
        Trainer(cfg).fit()


def test_mismatched_checkpoint_is_reported(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "m", "supervised", "train.iterations=2")
    Trainer(cfg).fit()
    other = tiny_config(
        synthetic_root,
        tmp_path / "m",
        "supervised",
        "train.iterations=4",
        "data.num_classes=7",
        "data.class_names=[]",
    )
    with pytest.raises(CheckpointError, match=r"different recipe \(data.num_classes: 6 -> 7"):
        Trainer(other).fit()
    # A checkpoint without a stored config (written elsewhere) still fails on the shapes.
    path = latest_checkpoint(tmp_path / "m" / "checkpoints")
    payload = torch.load(path, weights_only=True)
    del payload["config"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit this configuration"):
        Trainer(other).fit()


def test_semi_supervised_method_without_unlabelled_split(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "u", "pcr", "data.unlabeled_split=")
    with pytest.raises(ValueError, match="data.unlabeled_split"):
        Trainer(cfg)
