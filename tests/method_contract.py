"""The contract every registered method passes: one subclass per method (see test_methods.py).

Runs on timm's tiny ``test_resnet`` with a narrow decoder, so each check takes well under a
second on a CPU.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from protoseg.config import load_config
from protoseg.engine.optim import build_optimizer
from protoseg.lifecycle import InitContext
from protoseg.methods import create_method
from protoseg.models import create_model

NUM_CLASSES = 3
IGNORE = 255


def tiny_config(method: str, *extra: str):
    """A CPU-sized config of ``method``: test_resnet, narrow decoder, CE, no warm-up."""
    return load_config(
        None,
        [
            "data.root=unused",
            f"data.num_classes={NUM_CLASSES}",
            "data.crop_size=32",
            "model.backbone=test_resnet",
            "model.output_stride=16",
            "model.aspp_channels=16",
            "model.low_level_channels=8",
            "model.head_channels=16",
            "train.loss=ce",
            f"method.name={method}",
            *extra,
        ],
    )


def batches(seed: int = 1, b: int = 2, h: int = 33, w: int = 41) -> tuple[dict, dict]:
    """A labelled batch (its first rows ignored) and an unlabelled batch."""
    gen = torch.Generator().manual_seed(seed)
    labeled = {
        "image": torch.randn(b, 3, h, w, generator=gen),
        "mask": torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen),
    }
    labeled["mask"][:, :2] = IGNORE
    unlabeled = {"image": torch.randn(b, 3, h, w, generator=gen)}
    return labeled, unlabeled


class MethodContract:
    """Checks every method inherits; a subclass sets ``name`` (and ``overrides``)."""

    name: ClassVar[str]
    # Settings that make the unlabelled loss active on every pixel of the tiny batch.
    overrides: ClassVar[tuple[str, ...]] = ()
    # Settings that give a warm-up of one epoch (methods without one leave it empty).
    warmup: ClassVar[tuple[str, ...]] = ()

    def build(self, *extra: str, seed: int = 0):
        torch.manual_seed(seed)
        cfg = tiny_config(self.name, *self.overrides, *extra)
        method = create_method(create_model(cfg.model, cfg.data.num_classes), cfg)
        method.setup(steps_per_epoch=10)
        if method.needs_init(0):
            labeled, _ = batches(seed=7)
            method.initialize(InitContext([labeled], torch.device("cpu"), seed=0))
        method.train()
        return method, cfg

    def test_step_returns_a_loss_and_logged_terms(self):
        method, _ = self.build()
        labeled, unlabeled = batches()
        out = method.training_step(labeled, unlabeled, step=0)
        assert out["loss"].dim() == 0 and out["loss"].requires_grad
        assert torch.isfinite(out["loss"])
        # Every logged term is one finite number (the engine averages them as floats).
        for key, value in out.items():
            number = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            assert number.numel() == 1 and torch.isfinite(number), key

    def test_unlabelled_loss_reaches_the_student(self):
        method, _ = self.build()
        labeled, unlabeled = batches()
        if not method.uses_unlabeled:
            # A labelled-only method must not read the unlabelled batch at all.
            torch.manual_seed(4)
            with_unlabeled = method.training_step(labeled, unlabeled, step=0)["loss"]
            torch.manual_seed(4)
            without = method.training_step(labeled, None, step=0)["loss"]
            assert torch.equal(with_unlabeled, without)
            return
        labeled["mask"].fill_(IGNORE)  # no supervised signal: what is left is unlabelled
        out = method.training_step(labeled, unlabeled, step=0)
        assert out["loss"].item() > 0
        out["loss"].backward()
        grads = [p.grad for p in method.student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)

    def test_only_the_student_gets_gradients_and_is_optimised(self):
        method, cfg = self.build()
        labeled, unlabeled = batches()
        method.training_step(labeled, unlabeled, step=0)["loss"].backward()
        student = {id(p) for p in method.student.parameters()}
        others = [p for p in method.parameters() if id(p) not in student]
        assert all(p.grad is None and not p.requires_grad for p in others)
        optimiser = build_optimizer(method.student, cfg.optim)
        optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
        assert optimised == student

    def test_warmup_trains_on_labels_only(self):
        if not self.warmup:
            pytest.skip(f"{self.name} has no warm-up setting")
        method, _ = self.build(*self.warmup)
        assert method.warmup_steps > 0
        labeled, unlabeled = batches()
        out = method.training_step(labeled, unlabeled, step=0)
        assert set(out) <= {"loss", "loss_sup", "loss_aux"}
        # The unlabelled batch takes no part: the loss is the labelled batch's alone.
        other = {"image": torch.randn_like(unlabeled["image"])}
        torch.manual_seed(4)
        first = method.training_step(labeled, unlabeled, step=0)["loss"]
        torch.manual_seed(4)
        assert torch.equal(first, method.training_step(labeled, other, step=0)["loss"])
        # After the warm-up (and the one-time set-up it may ask for) the unlabelled losses join.
        end = method.warmup_steps
        method.before_step(end, lambda: InitContext([labeled], torch.device("cpu"), seed=0))
        after = method.training_step(labeled, unlabeled, step=end)
        assert set(after) - {"loss", "loss_sup", "loss_aux"}

    def test_restored_state_gives_the_same_next_step(self):
        first, _ = self.build(seed=0)
        labeled, unlabeled = batches()
        first.training_step(labeled, unlabeled, step=0)["loss"].backward()
        first.after_optimizer_step(0)
        state = {k: v.clone() for k, v in first.state_dict().items()}
        second, _ = self.build(seed=5)  # other initial weights, overwritten by the state
        second.load_state_dict(state)
        torch.manual_seed(3)
        a = first.training_step(labeled, unlabeled, step=1)
        torch.manual_seed(3)
        b = second.training_step(labeled, unlabeled, step=1)
        assert torch.equal(a["loss"], b["loss"])

    def test_same_seed_same_result(self):
        losses = []
        for _ in range(2):
            method, _ = self.build(seed=0)
            labeled, unlabeled = batches()
            torch.manual_seed(11)
            losses.append(method.training_step(labeled, unlabeled, step=0)["loss"])
        assert torch.equal(losses[0], losses[1])

    def test_every_deployed_head_predicts_every_pixel(self):
        method, _ = self.build()
        deployment = method.deploy()
        assert set(deployment["heads"]) <= set(method.heads)
        images = torch.randn(2, 3, 29, 37)
        for head in method.heads:
            model = method.inference_model(head).eval()
            with torch.no_grad():
                logits = model(images)["logits"]
            assert logits.shape == (2, NUM_CLASSES, 29, 37)
        assert deployment["network"] is method.inference_model("linear")

    def test_unknown_head_is_refused(self):
        method, _ = self.build()
        try:
            method.inference_model("no_such_head")
        except ValueError as exc:
            assert "no_such_head" in str(exc) and method.heads[0] in str(exc)
        else:
            raise AssertionError("an unknown head was accepted")
