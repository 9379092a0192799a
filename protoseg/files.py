"""Files protoseg writes and reads: atomic writes, and loads that never run code from a file.

Model files and training checkpoints are ``torch.save`` archives of plain data only (tensors,
numbers, strings, lists, dicts), so they are read with ``torch.load(weights_only=True)``: a
file that would need arbitrary pickled objects is refused before anything in it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

MODEL_FORMAT = "protoseg-model/2"
TRAINING_FORMAT = "protoseg-training/2"
# Model files of protoseg 0.1 (a "prototypes" entry instead of "heads"); still readable.
LEGACY_MODEL_FORMAT = "protoseg-model/1"
LEGACY_TRAINING_FORMAT = "protoseg-training/1"
TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint or model file is missing, unreadable, unsafe, or does not fit the model."""


def _umask() -> int:
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_files(folder: str | Path) -> list[Path]:
    """Leftover temporary files of interrupted atomic writes in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file())


def _remove_quietly(path: Path) -> None:
    """Delete a temporary file; on a read-only or vanished file system, leave it be.

    The cleanup runs while another error is on its way to the user: raising here would
    replace that error's message with a second, less useful traceback.
    """
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    lines = str(exc).splitlines()
    reason = getattr(exc, "strerror", None) or (lines[0] if lines else "")
    return CheckpointError(
        f"could not write {path} ({type(exc).__name__}: {reason}); check that the "
        "folder is writable and the disk has room. The previous file, if any, is intact"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name; on success it
    is fsynced and renamed over ``path``, on any failure removed (``path`` untouched).

    Ctrl-C or SIGTERM while the block runs is held until the file is complete (see
    ``protoseg.signals.deferred_interrupts``), so an interrupt never costs the file being
    written; a second interrupt stops at once, the previous file intact. OSError and
    RuntimeError (how torch reports a full disk) become a CheckpointError naming ``path``.
    ``durable=False`` skips the fsync: the file is never seen truncated, but a power cut
    may lose it (for bulk outputs such as generated datasets, where fsync costs the most).
    """
    from protoseg.signals import deferred_interrupts

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create the folder {path.parent} ({exc.strerror}); choose a writable "
            "output folder"
        ) from None
    tmp = path.parent / f".{path.name}.{os.getpid()}{TEMP_SUFFIX}"
    with deferred_interrupts(f"writing {path}"):
        try:
            yield tmp
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException as exc:
            _remove_quietly(tmp)
            if isinstance(exc, OSError | RuntimeError) and not isinstance(exc, CheckpointError):
                raise _write_failed(path, exc) from None
            raise


def atomic_write(
    path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True
) -> Path:
    """Call ``write`` on a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one. The new file
    gets the permissions of any file the user creates (0666 less the umask). A failed write
    (a full disk, say) removes its temporary file and raises CheckpointError naming ``path``;
    an interrupt during the write waits for it to finish (see ``atomic_path``, also for
    ``durable``).
    """
    path = Path(path)
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically (see ``atomic_write``)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def save_file(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` a plain-data dict to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_file(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    formats: tuple[str, ...] = (
        MODEL_FORMAT,
        TRAINING_FORMAT,
        LEGACY_MODEL_FORMAT,
        LEGACY_TRAINING_FORMAT,
    ),
) -> dict[str, Any]:
    """Read a protoseg model file or checkpoint without running any code stored in it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: refused, the file holds pickled Python objects that would run code "
                f"when loaded ({_unsafe_reason(exc)}). protoseg model files and checkpoints hold "
                "plain tensors and values only; do not load this file unless you trust its "
                "source and convert it"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint (not a torch archive). The file is "
            "truncated or not a protoseg checkpoint: delete it to resume from the previous one, "
            "or point --checkpoint at another file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}). The file is "
            "truncated or not a protoseg checkpoint: delete it to resume from the previous one, "
            "or point --checkpoint at another file"
        ) from None
    if not isinstance(data, dict) or data.get("format") not in formats:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(
            f"{path}: not a protoseg file of the expected kind (format {found!r}, expected one "
            f"of {', '.join(formats)}); was it written by protoseg?"
        )
    return data


def _unsafe_reason(exc: Exception) -> str:
    """The line of torch's refusal that names the blocked object."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or ["unsupported content"])[0][:200]


def load_state_strict(
    module: Any, state: dict[str, Any], path: str | Path, what: str = "model"
) -> None:
    """``module.load_state_dict(state)`` (any nn.Module or training method) that turns key and
    shape mismatches into a CheckpointError naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:4]
        raise CheckpointError(
            f"{path}: the {what} weights do not fit this configuration (different backbone, "
            f"number of classes or method?): {' '.join(first)}"
        ) from None


def non_finite_tensors(state: Mapping[str, Any] | list[Any], prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors holding NaN or infinity, in nested dicts
    and lists of a state dict, model file or checkpoint (other values are skipped)."""
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    bad: list[str] = []
    for key, value in items:
        name = f"{prefix}{key}"
        if torch.is_tensor(value):
            if (value.is_floating_point() or value.is_complex()) and not bool(
                torch.isfinite(value).all()
            ):
                bad.append(name)
        elif isinstance(value, Mapping | list):
            bad += non_finite_tensors(value, f"{name}.")
    return bad


def state_is_finite(state: Mapping[str, Any]) -> bool:
    """Whether every floating-point tensor of a (nested) state dict is finite: the test a
    checkpoint must pass before it is named as the last good one."""
    return not non_finite_tensors(state)


def refuse_non_finite(state: Mapping[str, Any], path: str | Path, what: str = "weights") -> None:
    """Raise CheckpointError naming the first tensors of ``state`` that hold NaN/infinity."""
    bad = non_finite_tensors(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{path}: refused, its {what} hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{more}); the run that wrote it diverged: use an earlier checkpoint, or retrain "
            "with a lower optim.lr"
        )
