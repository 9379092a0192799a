"""The allowed range of every number in a config, checked when the config is loaded.

Types alone let ``optim.lr=nan``, a negative loss weight (which trains the term backwards)
or ``optim.poly_power=-1`` (a division by zero several steps in) through. Here every
numeric field of ``Config``, the method sections included, has a range; a value outside
it is a ConfigError naming the key and the range, before anything is built.

Method fields are looked up by their key inside ``method:`` (``unsup_weight``,
``prototypes.loss_weight``), since several methods share one settings dataclass. A field
of a list type is checked element by element. ``tests/test_config_ranges.py`` checks that
every numeric field of every registered method has a range, so a new field cannot slip by.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values; every bound is optional."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        """Whether ``value`` is finite and inside the interval."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The interval in words, e.g. ``> 0``, ``in [0, 1]``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a finite number in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT = Range(0, 1)
UNIT_OPEN_TOP = Range(0, 1, high_open=True)
ANY = Range()

# Keys of the fixed sections (data, model, optim, train, eval).
CORE_RANGES: dict[str, Range] = {
    "data.num_classes": AT_LEAST_ONE,
    "data.ignore_index": Range(0, 255),  # masks are 8-bit PNGs
    "data.mean": UNIT,
    "data.std": POSITIVE,
    "data.crop_size": AT_LEAST_ONE,
    "data.scale_range": POSITIVE,
    "data.workers": NON_NEGATIVE,
    "data.prefetch_factor": AT_LEAST_ONE,
    "model.output_stride": AT_LEAST_ONE,
    "model.aspp_channels": AT_LEAST_ONE,
    "model.aspp_dilations": AT_LEAST_ONE,
    "model.low_level_channels": AT_LEAST_ONE,
    "model.head_channels": AT_LEAST_ONE,
    "model.dropout": UNIT_OPEN_TOP,
    "model.vit.features": NON_NEGATIVE,  # 0 = UniMatch V2's width for the encoder's size
    "model.vit.out_channels": NON_NEGATIVE,
    "optim.betas": UNIT_OPEN_TOP,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": UNIT_OPEN_TOP,
    "optim.decoder_lr_mult": NON_NEGATIVE,
    "optim.poly_power": POSITIVE,
    "train.epochs": POSITIVE,
    "train.iterations": NON_NEGATIVE,
    "train.batch_size": Range(2),
    "train.max_device_batch": NON_NEGATIVE,
    "train.ohem_threshold": UNIT,
    "train.ohem_min_kept": NON_NEGATIVE,
    "train.aux_weight": NON_NEGATIVE,
    "train.seed": ANY,
    "train.checkpoint_every": NON_NEGATIVE,
    "train.keep_last": AT_LEAST_ONE,
    "train.eval_every": NON_NEGATIVE,
    "train.log_every": AT_LEAST_ONE,
    "eval.window": AT_LEAST_ONE,
    "eval.stride": AT_LEAST_ONE,
    "eval.windows_per_batch": AT_LEAST_ONE,
    "eval.scales": POSITIVE,
    "eval.resize_to_multiple": NON_NEGATIVE,  # 0 = keep the image's size
}

# Keys inside ``method:``, for whichever method declares them.
METHOD_RANGES: dict[str, Range] = {
    "warmup_epochs": NON_NEGATIVE,
    "teacher_copy_epochs": NON_NEGATIVE,
    "ema_decay": UNIT_OPEN_TOP,
    "confidence_threshold": UNIT,
    "unsup_weight": NON_NEGATIVE,
    "cps_weight": NON_NEGATIVE,
    "strong_weight": NON_NEGATIVE,
    "fp_weight": NON_NEGATIVE,
    "fp_dropout": UNIT_OPEN_TOP,
    "mix_prob": UNIT,
    "comp_drop_unmasked": UNIT,
    "mix_area_range": UNIT,
    "mix_boxes": AT_LEAST_ONE,
    "noise_std": NON_NEGATIVE,
    "drop_percent": Range(0, 100),
    "prototypes.per_class": AT_LEAST_ONE,
    "prototypes.momentum": UNIT_OPEN_TOP,
    "prototypes.temperature": POSITIVE,
    "prototypes.loss_weight": NON_NEGATIVE,
    "prototypes.sample_grid": NON_NEGATIVE,  # 0 = every pixel
    "prototypes.init_pixels_per_class": AT_LEAST_ONE,
    "contrast.weight": NON_NEGATIVE,
    "contrast.dim": AT_LEAST_ONE,
    "contrast.queue_size": AT_LEAST_ONE,
    "contrast.first_class_queue_size": AT_LEAST_ONE,
    "contrast.num_queries": AT_LEAST_ONE,
    "contrast.num_negatives": AT_LEAST_ONE,
    "contrast.temperature": POSITIVE,
    "contrast.low_rank": AT_LEAST_ONE,
    "contrast.high_rank": AT_LEAST_ONE,
    "contrast.current_class_threshold": UNIT,
    "contrast.negative_threshold": UNIT,
    "contrast.low_entropy_threshold": Range(0, 50),  # a percentile of the low half
}


def numeric_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``dotted key -> value`` for every int, float or list-of-numbers field of a dataclass
    tree (bools are not numbers here)."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.update(numeric_fields(value, f"{key}."))
        elif _is_number(value) or (
            isinstance(value, list | tuple) and value and all(_is_number(v) for v in value)
        ):
            found[key] = value
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def range_of(key: str) -> Range | None:
    """The range of a dotted config key (``optim.lr``, ``method.unsup_weight``), or None."""
    if key.startswith("method."):
        return METHOD_RANGES.get(key[len("method.") :])
    return CORE_RANGES.get(key)


def range_errors(cfg: Any) -> list[str]:
    """One message per numeric value of ``cfg`` (a Config) outside its range.

    A numeric field without a listed range must still be finite.
    """
    errors = []
    for key, value in numeric_fields(cfg).items():
        allowed = range_of(key) or ANY
        values = value if isinstance(value, list | tuple) else [value]
        for index, item in enumerate(values):
            if not allowed.allows(float(item)):
                where = f"{key}[{index}]" if isinstance(value, list | tuple) else key
                errors.append(f"{where}={item!r} must be {allowed.describe()}")
    return errors


def check_ranges(cfg: Any) -> None:
    """Raise ConfigError listing every numeric value of ``cfg`` outside its allowed range."""
    from protoseg.config import ConfigError

    errors = range_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors) + " (set it in the YAML or as an override key=value)")
