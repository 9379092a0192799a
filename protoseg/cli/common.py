"""What the sub-command modules share: how a sub-command is added to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
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
