"""What the training loop hands a method at its one-time set-up (a low layer: torch only).

The engine builds an ``InitContext`` when a method asks for one (``before_step``); the
method and its parts (e.g. a prototype bank's k-means) use it. Neither side names the
other: the engine knows no method, and the parts know no loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class InitContext:
    """What a method may use once its warm-up ends (e.g. to build a prototype bank).

    ``labeled_loader`` yields the whole labelled set at original size with eval transforms;
    only rank 0 gets it, the other ranks receive None and wait for a broadcast.
    """

    labeled_loader: Iterable[dict[str, Any]] | None
    device: torch.device
    seed: int = 0


# Builds the context on demand: building it starts a data loader (which draws from the
# random stream), so the engine only pays for it when a method asks.
ContextFactory = Callable[[], InitContext]
