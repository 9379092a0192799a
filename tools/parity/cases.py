"""The parity case of each method: its settings, its batch and draws, and both sides' runs.

A case fixes the protoseg overrides that match the source's recipe on the tiny network, the
step it runs (after U2PL's warm-up and copy epochs, so its EMA and schedules are live),
how its already augmented batch and random draws are made (seeded), and how the source's
step is driven. ``replay`` runs protoseg's side from a fixture's stored tensors alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from protoseg.components.augment import box_masks, half_area_boxes
from protoseg.components.weak_strong import random_area_boxes
from tools.parity import fixtures
from tools.parity.protoseg_side import (
    IGNORE_INDEX,
    NUM_CLASSES,
    OPTIMIZER,
    StepResult,
    build_method,
    encoder_channels,
    load_network,
    loss_terms,
    quantized_state,
    queue_capacities,
    queue_contents,
    run_step,
    student_network,
    teacher_network,
)

BATCH, SIZE = 2, 33  # 33 px: the stride-4 maps (9 px) align exactly with align_corners
# Confidence threshold of the weak-to-strong checks: about half the tiny network's
# pixels pass it (UniMatch's 0.95 would keep almost none).
WEAK_STRONG_THRESHOLD = 0.4
# The teacher of U2PL's check starts as the student with every parameter times this (exact
# in fp32 on the stored int8 grid), so that teacher and student predictions differ.
TEACHER_FACTOR = 0.75


@dataclass
class Case:
    """One method's parity check."""

    method: str
    overrides: list[str]
    step: int
    steps_per_epoch: int
    source_hint: str


CASES: dict[str, Case] = {
    "fixmatch": Case(
        "fixmatch",
        [
            f"method.confidence_threshold={WEAK_STRONG_THRESHOLD}",
            "method.partner_labels=eval_pass",
        ],
        step=0,
        steps_per_epoch=1,
        source_hint="LiheYoung/UniMatch: fixmatch.py",
    ),
    "unimatch": Case(
        "unimatch",
        [
            f"method.confidence_threshold={WEAK_STRONG_THRESHOLD}",
            "method.partner_labels=eval_pass",
        ],
        step=0,
        steps_per_epoch=1,
        source_hint="LiheYoung/UniMatch: unimatch.py",
    ),
    "u2pl": Case(
        "u2pl",
        [
            "method.warmup_epochs=1",
            "method.teacher_copy_epochs=1",
            "method.mix_prob=1",
            "method.contrast.low_rank=1",
            "method.contrast.dim=16",
            "method.contrast.queue_size=64",
            "method.contrast.first_class_queue_size=96",
            "train.iterations=10",
        ],
        # Epoch 2 of 10 with one step per epoch: after the warm-up and the copy epoch.
        step=2,
        steps_per_epoch=1,
        source_hint="Haochen-Wang409/U2PL: train_semi.py train()",
    ),
    "cps": Case(
        "cps",
        ["method.release_passes=true", "method.cps_weight=1.5"],
        step=0,
        steps_per_epoch=1,
        source_hint="charlesCXK/TorchSemiSeg: exp.voc/voc8.res50v3+.CPS+CutMix/train.py",
    ),
}


def _required(module: Any) -> Any:
    """``module``, which must exist (U2PL's teacher)."""
    if module is None:
        raise ValueError("this method has no EMA teacher")
    return module


def _settings(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def make_inputs(name: str, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The already augmented batch and the random draws of ``name``'s check."""
    gen = torch.Generator().manual_seed(seed)
    b, s = BATCH, SIZE
    batch = {
        "image_l": torch.randn(b, 3, s, s, generator=gen),
        "mask_l": torch.randint(0, NUM_CLASSES, (b, s, s), generator=gen),
        "image_u": torch.randn(b, 3, s, s, generator=gen),
    }
    batch["mask_l"][:, :2] = IGNORE_INDEX
    draws: dict[str, Tensor] = {}
    torch.manual_seed(seed)  # the box helpers draw from the global generator
    if name in ("fixmatch", "unimatch"):
        valid = torch.ones(b, s, s, dtype=torch.bool)
        valid[1, -5:] = False  # padding at the bottom of the second crop
        batch["valid_u"] = valid
        for k in (1, 2):
            draws[f"strong{k}"] = batch["image_u"] + 0.5 * torch.randn(b, 3, s, s, generator=gen)
            draws[f"boxes{k}"] = random_area_boxes(b, s, s, torch.device("cpu"))
        draws["boxes2"][0] = False  # one image of one view without a box
        # A second, independent unlabelled batch: UniMatch's own mixing batch.
        batch["image_u_mix"] = torch.randn(b, 3, s, s, generator=gen)
        for k in (1, 2):
            draws[f"strong{k}_mix"] = batch["image_u_mix"] + 0.5 * torch.randn(
                b, 3, s, s, generator=gen
            )
    elif name == "u2pl":
        draws["boxes"] = half_area_boxes(b, s, s, torch.device("cpu"))
        draws["contrast_seed"] = torch.tensor(1234)
    elif name == "cps":
        draws["masks"] = box_masks(b, s, s, (0.25, 0.5), 3, torch.device("cpu"))
        batch["image_u_mix"] = torch.randn(b, 3, s, s, generator=gen)
    return batch, draws


def fp_masks(method: Any, seed: int) -> dict[str, Tensor]:
    """UniMatch's channel-dropout draws (p = 0.5, kept channels x 2) for both encoder maps."""
    gen = torch.Generator().manual_seed(seed + 1)
    low, high = encoder_channels(method)
    n = 2 * BATCH
    return {
        f"fp_{key}": (torch.rand(n, c, 1, 1, generator=gen) >= 0.5).float() * 2.0
        for key, c in (("low", low), ("high", high))
    }


def initial_state(name: str, method: Any) -> dict[str, Tensor]:
    """The check's network: the method's student, quantised (and nothing else)."""
    return quantized_state(student_network(method))


def load_initial(name: str, method: Any, student_state: dict[str, Tensor]) -> None:
    """Put the check's network into ``method`` (and an EMA teacher, derived from it)."""
    load_network(method, student_state, TEACHER_FACTOR)


def protoseg_batches(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The labelled and unlabelled batches protoseg's training_step takes."""
    labeled = {"image": batch["image_l"], "mask": batch["mask_l"]}
    unlabeled = {"image": batch["image_u"]}
    if "valid_u" in batch:
        unlabeled["valid"] = batch["valid_u"]
    return labeled, unlabeled


def canonical(name: str, result: StepResult) -> dict[str, dict[str, Tensor]]:
    """protoseg's results under the source's names: terms, grads and state."""
    terms = {k: result.terms[v] for k, v in loss_terms(name).items()}
    state = {k: v for k, v in result.state.items() if not k.startswith("queues.")}
    return {"term": terms, "grad": result.grads, "state": state}


def protoseg_run(
    name: str,
    overrides: list[str],
    student_state: dict[str, Tensor],
    batch: dict[str, Tensor],
    draws: dict[str, Tensor],
    case: Case | None = None,
) -> dict[str, dict[str, Tensor]]:
    """protoseg's step on the check's network, batch and draws, under the source's names."""
    case = case or CASES[name]
    method, _ = build_method(name, overrides, case.steps_per_epoch)
    load_initial(name, method, student_state)
    labeled, unlabeled = protoseg_batches(batch)
    result = run_step(name, method, labeled, unlabeled, case.step, draws)
    out = canonical(name, result)
    out["state"].update(queue_contents(method))
    return out


def replay(
    tensors: dict[str, Tensor], meta: dict[str, Any], extra: tuple[str, ...] = ()
) -> dict[str, dict[str, Tensor]]:
    """protoseg's results on a fixture's stored inputs (no source needed); ``extra``
    overrides follow the fixture's own (to break a method on purpose)."""
    name = meta["method"]
    return protoseg_run(
        name,
        [*meta["overrides"], *extra],
        fixtures.unpack_weights(tensors),
        fixtures.section(tensors, "batch."),
        fixtures.section(tensors, "draw."),
    )


# ---- the source's side ------------------------------------------------------------------


def source_run(
    name: str,
    source: Path,
    student_state: dict[str, Tensor],
    batch: dict[str, Tensor],
    draws: dict[str, Tensor],
    variant: str = "exact",
) -> dict[str, dict[str, Tensor]]:
    """The source's step on the same network, batch and draws.

    ``variant``: "exact" gives the source the partner protoseg uses (image (i + 1) mod B
    as UniMatch's mixing batch and CPS's second batch); "second_batch" gives it an
    independent batch, as its loaders do.
    """
    from tools.parity import source_side

    case = CASES[name]
    method, _ = build_method(name, case.overrides, case.steps_per_epoch)
    load_initial(name, method, student_state)
    roll = (lambda t: torch.roll(t, shifts=-1, dims=0)) if variant == "exact" else None
    if name in ("fixmatch", "unimatch"):
        valid = batch["valid_u"]
        ignore = torch.where(valid, 0, 255).long()
        boxes = [draws["boxes1"].float(), draws["boxes2"].float()]
        strong = [draws["strong1"].clone(), draws["strong2"].clone()]
        if roll is not None:
            mix = (roll(batch["image_u"]), roll(strong[0]), roll(strong[1]), roll(ignore))
        else:
            mix = (
                batch["image_u_mix"],
                draws["strong1_mix"].clone(),
                draws["strong2_mix"].clone(),
                torch.zeros_like(ignore),
            )
        item = (
            0,
            (
                (batch["image_l"], batch["mask_l"]),
                (batch["image_u"], strong[0], strong[1], ignore, boxes[0], boxes[1]),
                (*mix, boxes[0], boxes[1]),
            ),
        )
        from tools.parity.protoseg_side import FixedChannelDrop

        drop = FixedChannelDrop([draws["fp_low"], draws["fp_high"]]) if "fp_low" in draws else None
        res = source_side.unimatch_loop(
            source,
            f"{name}.py",
            copy.deepcopy(student_network(method)),
            drop,  # type: ignore[arg-type]
            item,
            float(_settings(case.overrides, "method.confidence_threshold")),
            OPTIMIZER,
        )
    elif name == "u2pl":
        cfg = source_side.u2pl_config(source, NUM_CLASSES, 10, low_rank=1)
        with source_side.process_group():
            res = source_side.u2pl_train(
                source,
                copy.deepcopy(student_network(method)),
                copy.deepcopy(_required(teacher_network(method))),
                batch,
                draws["boxes"],
                int(draws["contrast_seed"]),
                epoch=case.step,
                cfg=cfg,
                queue_sizes=queue_capacities(method),
                optimizer_settings=OPTIMIZER,
            )
        res.pop("contra_loss_local")
        for c, keys in enumerate(res.pop("queues")):
            res["state"][f"queue.{c}"] = keys
    elif name == "cps":
        u1 = roll(batch["image_u"]) if roll is not None else batch["image_u_mix"]
        res = source_side.cps_loop(
            source,
            copy.deepcopy(student_network(method)),
            batch["image_l"],
            batch["mask_l"],
            batch["image_u"],
            u1,
            draws["masks"][:, None].float(),
            float(_settings(case.overrides, "method.cps_weight")),
            OPTIMIZER,
        )
    else:
        raise ValueError(f"no parity case for {name!r}")
    return {"term": res["terms"], "grad": res["grads"], "state": res["state"]}


def all_draws(name: str, method: Any, seed: int) -> dict[str, Tensor]:
    """The random draws of the check, including those that depend on the network's shape."""
    _, draws = make_inputs(name, seed)
    if name == "unimatch":
        draws.update(fp_masks(method, seed))
    return draws
