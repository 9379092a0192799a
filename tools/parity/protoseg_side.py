"""protoseg's side of every parity check: the one place that builds a method and runs its step.

Everything the checks and tests/test_source_parity.py need of protoseg goes through this
module: the tiny network, the method built from a config, the random draws of a step
replaced by stored values, one training step, its backward pass and one optimiser step.
A refactoring of ``protoseg.methods`` only has to be followed here.

How the draws are fixed, per method (each replaces protoseg's own draw by the value the
source received, so both sides see one batch):

- fixmatch / unimatch: ``cutmix_boxes`` returns the stored boxes (one call per strong
  view), the method's ``photometric`` returns the stored strong views, and unimatch's
  ``drop_channels`` multiplies by the stored channel masks (one for the low-level map, one
  for the last encoder map, told apart by their channel count).
- u2pl: ``method.mix_prob=1`` (the source's mixing draw is fixed to "mix" too), the half-
  area box draw returns the stored boxes, and torch's generator is seeded with the stored
  seed right before the contrastive loss, whose anchor and negative indices the source
  draws from the same seeded generator in the same order.
- cps: ``box_masks`` returns the stored masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from protoseg.config import Config, load_config
from protoseg.methods import create_method
from protoseg.models import create_model

NUM_CLASSES = 3
IGNORE_INDEX = 255
# The tiny network of every check: timm's test_resnet with a narrow decoder and no dropout
# (dropout masks are the network's draws, not the method's; without them the forward is
# deterministic).
TINY_NETWORK = [
    "data.root=unused",
    f"data.num_classes={NUM_CLASSES}",
    "model.backbone=test_resnet",
    "model.output_stride=16",
    "model.aspp_channels=16",
    "model.low_level_channels=8",
    "model.head_channels=16",
    "model.dropout=0",
    "train.loss=ce",
]
# One SGD step on both sides (the optimiser is torch's, not the method's).
OPTIMIZER = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}


@dataclass
class StepResult:
    """What one step computed: logged terms, parameter gradients and the state after it."""

    terms: dict[str, Tensor]
    grads: dict[str, Tensor]
    state: dict[str, Tensor] = field(default_factory=dict)


def build_method(name: str, overrides: list[str], steps_per_epoch: int = 1) -> tuple[Any, Config]:
    """The method ``name`` on the tiny network, with the check's settings, in train mode."""
    cfg = load_config(None, [*TINY_NETWORK, f"method.name={name}", *overrides])
    method = create_method(create_model(cfg.model, cfg.data.num_classes), cfg)
    method.setup(steps_per_epoch=steps_per_epoch)
    method.train()
    return method, cfg


def student_network(method: Any) -> nn.Module:
    """The module the optimiser trains (its parameter names name the gradients)."""
    student: nn.Module = method.student
    return student


def teacher_network(method: Any) -> nn.Module | None:
    """The EMA teacher's network of ``method``, if it has one."""
    teacher = getattr(method, "teacher", None)
    network: nn.Module | None = None if teacher is None else teacher.network
    return network


def encoder_channels(method: Any) -> tuple[int, int]:
    """Channels of the low-level and the last encoder map (UniMatch's perturbed maps)."""
    low, _, high = method.student.backbone.channels
    return int(low), int(high)


def queue_capacities(method: Any) -> list[int]:
    """U2PL's per-class queue lengths."""
    return list(method.queues.capacities)


def queue_contents(method: Any) -> dict[str, Tensor]:
    """U2PL's queues, oldest key first, as ``queue.<class>`` (none for other methods)."""
    queues = getattr(method, "queues", None)
    if queues is None:
        return {}
    return {f"queue.{c}": queues.queue(c) for c in range(len(queues.capacities))}


def load_network(method: Any, student_state: dict[str, Tensor], teacher_factor: float) -> None:
    """Put the check's network into the student; an EMA teacher gets the same network with
    every parameter times ``teacher_factor`` (so that the two predict differently)."""
    student = student_network(method)
    set_weights(student, student_state)
    teacher = teacher_network(method)
    if teacher is not None:
        params = dict(student.named_parameters())
        derived = {
            k: v * teacher_factor if k in params else v.clone() for k, v in student_state.items()
        }
        set_weights(teacher, derived)


class _Sequence:
    """Returns the stored values one call after another (then fails: a call too many)."""

    def __init__(self, name: str, values: list[Tensor]) -> None:
        self.name, self.values, self.calls = name, values, 0

    def next(self) -> Tensor:
        if self.calls >= len(self.values):
            raise RuntimeError(f"protoseg drew {self.name} more often than the source did")
        value = self.values[self.calls]
        self.calls += 1
        return value


class FixedChannelDrop:
    """Channel dropout with stored masks (B, C, 1, 1), chosen by the map's channel count."""

    def __init__(self, masks: list[Tensor]) -> None:
        self.masks = {int(m.shape[1]): m for m in masks}

    def __call__(self, features: Tensor) -> Tensor:
        return features * self.masks[int(features.shape[1])].to(features.dtype)


@contextlib.contextmanager
def fixed_draws(name: str, method: Any, draws: dict[str, Tensor]) -> Iterator[None]:
    """Replace the random draws of ``method``'s step by ``draws`` (see the module docstring)."""
    import protoseg.components.augment as augment_module
    import protoseg.methods.cps as cps_module
    import protoseg.methods.fixmatch as fixmatch_module
    import protoseg.methods.u2pl as u2pl_module
    import protoseg.methods.unimatch as unimatch_module

    base = name.split("+")[0]
    patches: list[tuple[Any, str, Any]] = []
    if base in ("fixmatch", "unimatch"):
        views = 1 if base == "fixmatch" else 2
        boxes = _Sequence("CutMix boxes", [draws[f"boxes{k}"] for k in range(1, views + 1)])
        strong = _Sequence("strong views", [draws[f"strong{k}"] for k in range(1, views + 1)])
        module = fixmatch_module if base == "fixmatch" else unimatch_module
        patches.append((module, "cutmix_boxes", lambda *args: boxes.next()))
        patches.append((method, "photometric", lambda images, valid: strong.next()))
        if base == "unimatch":
            patches.append(
                (method, "drop_channels", FixedChannelDrop([draws["fp_low"], draws["fp_high"]]))
            )
    elif base == "u2pl":
        boxes = _Sequence("CutMix boxes", [draws["boxes"]])
        patches.append((augment_module, "half_area_boxes", lambda *args: boxes.next()))
        original = u2pl_module.contrastive_loss
        seed = int(draws["contrast_seed"])

        def seeded(*args: Any, **kwargs: Any) -> Tensor:
            torch.manual_seed(seed)
            return original(*args, **kwargs)

        patches.append((u2pl_module, "contrastive_loss", seeded))
    elif base == "cps":
        masks = _Sequence("CutMix masks", [draws["masks"]])
        patches.append((cps_module, "box_masks", lambda *args: masks.next()))
    else:
        raise ValueError(f"no parity check for method {name!r}")
    saved = [(obj, attr, obj.__dict__.get(attr, _MISSING)) for obj, attr, _ in patches]
    try:
        for obj, attr, value in patches:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, old in saved:
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()


def run_step(
    name: str,
    method: Any,
    labeled: dict[str, Tensor],
    unlabeled: dict[str, Tensor],
    step: int,
    draws: dict[str, Tensor],
) -> StepResult:
    """One training step with fixed draws, its backward pass, one SGD step and the method's
    ``after_optimizer_step``. Terms are the step's logged tensors; grads are by parameter
    name of the student; state is the method's state dict after the step."""
    student = student_network(method)
    optimizer = torch.optim.SGD(student.parameters(), **OPTIMIZER)  # type: ignore[arg-type]
    optimizer.zero_grad()
    with fixed_draws(name, method, draws):
        out = method.training_step(labeled, unlabeled, step)
    out["loss"].backward()
    terms = {k: torch.as_tensor(v).detach().float().clone() for k, v in out.items()}
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in student.named_parameters()
    }
    optimizer.step()
    method.after_optimizer_step(step)
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    return StepResult(terms, grads, state)


def quantize(t: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, power-of-two scale) whose product is a float tensor close to ``t``.

    Fixture weights are stored this way and the checks run on the product, which fp32 holds
    exactly, so both sides use exactly the stored network at a quarter of the fp32 size.
    """
    peak = float(t.detach().abs().max()) if t.numel() else 0.0
    scale = 2.0 ** torch.ceil(torch.log2(torch.tensor(max(peak, 1e-30) / 127.0)))
    codes = torch.round(t.detach().float() / scale).clamp(-127, 127).to(torch.int8)
    return codes, scale.float()


def quantized_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict with every float tensor replaced by its quantised value."""
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            codes, scale = quantize(value)
            state[key] = codes.float() * scale
        else:
            state[key] = value.clone()
    return state


def set_weights(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load ``state`` into ``module`` (every key must match)."""
    module.load_state_dict(state, strict=True)


def loss_terms(name: str) -> dict[str, str]:
    """protoseg's logged name of each compared loss term, by the canonical term name."""
    base = name.split("+")[0]
    table: dict[str, dict[str, str]] = {
        "fixmatch": {"loss_x": "loss_sup", "loss_s": "loss_unsup", "loss": "loss"},
        "unimatch": {
            "loss_x": "loss_sup",
            "loss_s": "loss_unsup",
            "loss_w_fp": "loss_fp",
            "loss": "loss",
        },
        "u2pl": {
            "sup_loss": "loss_sup",
            "unsup_loss": "loss_unsup",
            "contra_loss": "loss_contrast",
            "loss": "loss",
        },
        "cps": {"loss_sup_both": "loss_sup", "cps_loss": "loss_cps", "loss": "loss"},
    }
    return table[base]
