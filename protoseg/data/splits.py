"""Split files in the U2PL format: one image entry per line.

Real files often lack a trailing newline; blank lines and surrounding whitespace are ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protoseg.files import atomic_write

log = logging.getLogger(__name__)

# What torch's ExceptionWrapper hands the exception class when it re-raises a DataLoader
# worker's (or pin-memory thread's) exception in the main process.
_WRAPPED = re.compile(r"\ACaught \w+ (?P<where>.+?)\.\nOriginal Traceback", re.DOTALL)
# Where the worker's own message starts: the last "...DataError: " line of that traceback.
_WRAPPED_MESSAGE = re.compile(r"^(?:[\w.]+\.)?DataError: ", re.MULTILINE)


class DataError(ValueError):
    """A dataset file or setting is unusable; the message names the file and the fix.

    Raised in a DataLoader worker, it reaches the main process with its one-line message;
    ``where`` then says which worker and ``worker_traceback`` holds the worker's traceback.
    """

    def __init__(self, *args: object) -> None:
        self.where = ""
        self.worker_traceback = ""
        if len(args) == 1 and isinstance(args[0], str):
            # torch re-raises a worker's exception as ExceptionClass("Caught ... Original
            # Traceback ..."); keep the user's message and set the traceback aside.
            wrapped = _WRAPPED.match(args[0])
            if wrapped:
                tail = args[0][wrapped.end() :]
                starts = list(_WRAPPED_MESSAGE.finditer(tail))
                if starts:
                    self.where = wrapped.group("where")
                    self.worker_traceback = args[0]
                    args = (tail[starts[-1].end() :].rstrip(),)
        super().__init__(*args)


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


def duplicate_entries(entries: Sequence[tuple[int, str]]) -> dict[str, list[int]]:
    """Entries listed more than once, each with all its line numbers, in file order."""
    lines: dict[str, list[int]] = {}
    for number, entry in entries:
        lines.setdefault(entry, []).append(number)
    return {entry: numbers for entry, numbers in lines.items() if len(numbers) > 1}


def describe_duplicates(duplicates: dict[str, list[int]], shown: int = 5) -> str:
    """ "'a' on lines 2, 7; 'b' on lines 3, 4 (and N more)" for an error or warning message."""
    parts = [
        f"{entry!r} on lines {', '.join(map(str, numbers))}"
        for entry, numbers in list(duplicates.items())[:shown]
    ]
    more = len(duplicates) - shown
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def write_split(path: str | Path, names: Sequence[str], overwrite: bool = False) -> None:
    """Write a split file, one entry per line with a trailing newline; creates parent dirs.

    An existing file is replaced only with ``overwrite=True`` (the CLI's ``--force``).
    """
    path = Path(path)
    for name in names:
        if not name.strip() or "\n" in name or "\r" in name:
            raise DataError(f"{path}: split entry {name!r} is blank or spans lines; fix the name")
    if not overwrite:
        refuse_existing([path])
    text = "".join(f"{name}\n" for name in names).encode("utf-8")
    # Through a temporary file: a full disk leaves no truncated list (a split that silently
    # lost its last names would train on fewer images).
    atomic_write(path, lambda handle: handle.write(text))


def refuse_existing(paths: Sequence[str | Path]) -> None:
    """DataError naming the first of ``paths`` that exists, suggesting --force."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing:
        others = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise DataError(
            f"{existing[0]}: already exists{others}; pass --force (overwrite=True) to replace "
            f"it, or write to another --out folder"
        )


def unique_names(names: Sequence[str], source: str | Path = "the name list") -> list[str]:
    """``names`` with repeats dropped (first occurrence kept); a warning lists the repeats."""
    duplicates = duplicate_entries([(i, name) for i, name in enumerate(names, start=1)])
    if not duplicates:
        return list(names)
    log.warning(
        "%s: %d names are listed more than once and are used once each: %s",
        source,
        len(duplicates),
        describe_duplicates(duplicates),
    )
    return list(dict.fromkeys(names))


def make_split(names: Sequence[str], num_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Draw num_labeled names at random (fixed by seed); both lists keep the input order.

    A name listed twice is used once (with a warning), so it never lands in both lists.
    """
    names = unique_names(names)
    if not 1 <= num_labeled <= len(names):
        raise DataError(
            f"num_labeled={num_labeled} must lie in [1, {len(names)}] (the number of names)"
        )
    chosen = np.zeros(len(names), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(names))[:num_labeled]] = True
    labeled = [name for name, keep in zip(names, chosen) if keep]
    unlabeled = [name for name, keep in zip(names, chosen) if not keep]
    return labeled, unlabeled


def split_list(
    list_file: str | Path,
    out_dir: str | Path,
    num_labeled: int,
    seed: int = 0,
    force: bool = False,
) -> tuple[Path, Path]:
    """``protoseg data split``: draw a labelled/unlabelled split of a name list and write it.

    Names listed twice are used once, with a warning giving their line numbers. Writes
    ``out_dir/labeled.txt`` and ``out_dir/unlabeled.txt``; existing files are replaced only
    with ``force``, and neither is written when either would be refused.
    """
    list_file = Path(list_file)
    entries = read_split_lines(list_file, "--list")
    duplicates = duplicate_entries(entries)
    if duplicates:
        log.warning(
            "%s: %d names are listed more than once and are used once each: %s",
            list_file,
            len(duplicates),
            describe_duplicates(duplicates),
        )
    names = list(dict.fromkeys(entry for _, entry in entries))
    if not 1 <= num_labeled <= len(names):
        raise DataError(
            f"--num-labeled {num_labeled} must lie in [1, {len(names)}], the number of distinct "
            f"names in {list_file}"
        )
    labeled, unlabeled = make_split(names, num_labeled, seed)
    out_dir = Path(out_dir)
    targets = (out_dir / "labeled.txt", out_dir / "unlabeled.txt")
    if not force:
        refuse_existing(targets)
    # An empty unlabelled list is a valid split (every name labelled) but not a valid file.
    write_split(targets[0], labeled, overwrite=True)
    write_split(targets[1], unlabeled or labeled, overwrite=True)
    return targets
