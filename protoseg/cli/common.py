"""What the sub-command modules share: how a sub-command is added to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

OVERRIDES_EPILOG = (
    "Overrides are dotted keys of the config, e.g. data.root=/data/voc train.iterations=200."
)


def add_command(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
    overrides: bool = False,
) -> argparse.ArgumentParser:
    """A sub-command running ``func``; the overrides note only where overrides are taken."""
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=OVERRIDES_EPILOG if overrides else None,
    )
    parser.set_defaults(func=func)
    return parser


def add_overwrite_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--overwrite`` (``--force`` its other spelling): replace earlier results of the command.

    Inputs and model files are never replaced, whatever the flag (see ``protoseg.outputs``).
    """
    parser.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true", help=help_text
    )


def guard_outputs(
    outputs: Sequence[str | Path],
    overwrite: bool,
    models: Sequence[str | Path] = (),
    inputs: Sequence[str | Path | None] = (),
    dataset: str | Path | None = None,
) -> None:
    """Refuse outputs that would replace a model file, an input, a dataset file, or (without
    ``--overwrite``) an earlier result; see ``protoseg.outputs.check_outputs``."""
    from protoseg.outputs import check_outputs, protect

    protected = [
        *protect(models, "model file being read"),
        *protect(inputs, "input"),
        *protect([dataset], "dataset folder (data.root)"),
    ]
    check_outputs(outputs, protected, overwrite)
