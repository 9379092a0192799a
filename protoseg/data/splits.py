"""Split files in the U2PL format: one image entry per line.

Real files often lack a trailing newline; blank lines and surrounding whitespace are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file or setting is unusable; the message names the file and the fix."""


def read_split_lines(path: str | Path, config_key: str = "") -> list[tuple[int, str]]:
    """The non-blank entries of a split file with their 1-based line numbers."""
    path = Path(path)
    setting = f"data.root / {config_key}" if config_key else "data.root and the split path"
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a split file; check {setting}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found; check {setting}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read split file ({exc}); check {setting}") from None
    try:
        # utf-8-sig drops the byte-order mark some editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not a UTF-8 text file ({exc}); a split file lists one image per line"
        ) from None
    entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    entries = [(n, line) for n, line in entries if line]
    if not entries:
        raise DataError(f"{path}: split file is empty; list one image per line or check {setting}")
    return entries


def read_split(path: str | Path, config_key: str = "") -> list[str]:
    """The entries of a split file, in file order (config_key names the setting in errors)."""
    return [line for _, line in read_split_lines(path, config_key)]


def write_split(path: str | Path, names: Sequence[str]) -> None:
    """Write a split file, one entry per line with a trailing newline; creates parent dirs."""
    path = Path(path)
    for name in names:
        if not name.strip() or "\n" in name or "\r" in name:
            raise DataError(f"{path}: split entry {name!r} is blank or spans lines; fix the name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))


def make_split(names: Sequence[str], num_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Draw num_labeled names at random (fixed by seed); both lists keep the input order."""
    if not 1 <= num_labeled <= len(names):
        raise DataError(
            f"num_labeled={num_labeled} must lie in [1, {len(names)}] (the number of names)"
        )
    chosen = np.zeros(len(names), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(names))[:num_labeled]] = True
    labeled = [name for name, keep in zip(names, chosen) if keep]
    unlabeled = [name for name, keep in zip(names, chosen) if not keep]
    return labeled, unlabeled
