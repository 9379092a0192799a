"""The one check every command runs on the files it is about to write.

The rule: no output replaces an input, a model file or an earlier result unless the user
passed ``--overwrite`` (``--force`` is accepted as its other name), and an input is never
replaced even then. "The same file" is decided by the file system (``os.path.samefile``:
device and inode, so hard links, symlinks and ``a/../a`` spellings all count), not by
comparing the spelling of two paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

OVERWRITE_FLAG = "--overwrite"


class OutputError(ValueError):
    """An output would replace a file it must not; the message names both and the fix."""


@dataclass(frozen=True)
class Protected:
    """A file or folder that outputs must not replace: ``role`` words the error."""

    path: Path
    role: str


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (inode and device when both exist, else real paths)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def file_identity(path: str | Path) -> tuple[int, int]:
    """(device, inode) of an existing file: equal for every name of one file."""
    stat = Path(path).stat()
    return stat.st_dev, stat.st_ino


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (existing or not) lies in ``folder`` once symlinks are followed."""
    try:
        real, root = path.resolve(), folder.resolve()
    except OSError:
        return False
    return real == root or root in real.parents


def protect(paths: Iterable[str | Path | None], role: str) -> list[Protected]:
    """``Protected`` entries for the given paths (None and empty entries are skipped)."""
    return [Protected(Path(p), role) for p in paths if p not in (None, "")]


def check_outputs(
    outputs: Sequence[str | Path],
    protected: Sequence[Protected] = (),
    overwrite: bool = False,
    flag: str = OVERWRITE_FLAG,
) -> None:
    """Refuse outputs that would replace a protected file, or an existing one without ``flag``.

    A protected *file* is never replaced, whatever the flag. A protected *folder* (a
    dataset root, an input folder) may receive new files, but an existing file inside it
    is never replaced. Any other existing output needs ``overwrite``. Raises OutputError
    naming the output, what it would replace, and the fix; writes nothing.
    """
    for out in map(Path, outputs):
        for guard in protected:
            if guard.path.is_dir():
                if out.exists() and _inside(out, guard.path):
                    raise OutputError(
                        f"{out} is a file inside the {guard.role} {guard.path}; writing it "
                        "would replace an input: choose an output outside that folder"
                    )
            elif same_file(out, guard.path):
                raise OutputError(
                    f"{out} is the {guard.role} ({guard.path}); writing it would replace "
                    "that file: choose another output name (inputs are never replaced)"
                )
        if out.is_dir():
            raise OutputError(f"{out} is a folder; give a file name for the output")
        if out.exists() and not overwrite:
            raise OutputError(
                f"{out} already exists (an earlier result?); pass {flag} to replace it, or "
                "choose another output name"
            )


def check_writable_folder(path: str | Path, what: str = "--out") -> None:
    """Refuse an output whose folder is missing-and-uncreatable or not writable, up front."""
    folder = Path(path).parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{what} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK):
        raise OutputError(f"{what} {path}: the folder {probe} is not writable")


RUN_RESULTS = ("model.pt", "best.pt", "eval_final_linear.json", "history.json")


def check_finished_run(out_dir: str | Path, has_checkpoint: bool, overwrite: bool) -> None:
    """Refuse to train from scratch into a run folder that already holds a finished run.

    A folder with ``model.pt`` or ``best.pt`` but nothing to resume from (its
    ``checkpoints/`` deleted) would be retrained and its results replaced.
    """
    out = Path(out_dir)
    found = [out / name for name in RUN_RESULTS if (out / name).is_file()]
    if found and not has_checkpoint and not overwrite:
        raise OutputError(
            f"{out} holds the results of a finished run ({', '.join(p.name for p in found)}) "
            "and no checkpoint to resume from; training would start again and replace them. "
            f"Choose another train.out_dir, or pass {OVERWRITE_FLAG} to retrain into it"
        )
