"""When protoseg draws progress bars: one rule for training, evaluation and analysis."""

from __future__ import annotations

import sys


def show_progress(wanted: bool) -> bool:
    """Progress bars only on a terminal: in a batch job's log they are noise (log lines are
    written instead)."""
    return wanted and sys.stderr.isatty()
