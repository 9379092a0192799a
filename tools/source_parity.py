"""One training step of a protoseg method against its authors' own step code, on a CPU.

Not run by CI: it needs a local clone of the method's source, which protoseg does not copy.
For ``--method`` it builds the tiny network once (timm's test_resnet, a narrow decoder, no
dropout, weights on an int8 grid), one already augmented batch and the step's random
draws, then runs

- protoseg's ``training_step`` + backward + one SGD step + ``after_optimizer_step``
  (``tools/parity/protoseg_side.py``, with the draws fixed there), and
- the source's own step code from ``--source`` on copies of the same network wrapped to its
  calling convention (``tools/parity/source_side.py`` says how each source is driven:
  UniMatch's and CPS's loop bodies are extracted from the user's file and executed, U2PL's
  ``train`` is imported and called for one iteration),

and prints the max abs difference of every loss term, of every parameter's gradient and of
the state after the step (BatchNorm statistics, parameters, U2PL's EMA teacher and queues).
It then runs the departures: protoseg's default settings against the same source step, and
the source with its own independent second batch.

Sources (clone, or ``git archive`` a mirror, anywhere)::

    fixmatch, unimatch  LiheYoung/UniMatch @ 0324f3d: fixmatch.py, unimatch.py
    u2pl                Haochen-Wang409/U2PL @ ab3d2be: train_semi.py, u2pl/utils/*.py
    cps                 charlesCXK/TorchSemiSeg @ 5e0c29c:
                        exp.voc/voc8.res50v3+.CPS+CutMix/train.py

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/source_parity.py --method u2pl \\
        --source /path/to/U2PL --fixture-dir tests/data/parity --world-size 2

``--fixture-dir`` writes what the source computed to ``<dir>/<method>.safetensors`` (the
command is kept in its metadata) for tests/test_source_parity.py. ``--world-size N`` (u2pl)
also runs the source in N gloo processes on the same batch, which shows the gradient of its
all-reduced contrastive loss scaled by 1/N.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from tools.parity import fixtures  # noqa: E402
from tools.parity.cases import (  # noqa: E402
    CASES,
    all_draws,
    initial_state,
    make_inputs,
    protoseg_run,
    source_run,
)
from tools.parity.protoseg_side import build_method  # noqa: E402

Results = dict[str, dict[str, Tensor]]


def _required(module: Any) -> Any:
    """``module``, which must exist (U2PL's teacher)."""
    if module is None:
        raise ValueError("this method has no EMA teacher")
    return module


def differences(mine: Results, theirs: Results) -> dict[str, tuple[float, str]]:
    """Per group (term, grad, state): the largest max abs difference and where it is."""
    out = {}
    for group in ("term", "grad", "state"):
        worst, where = 0.0, "-"
        for key, ref in theirs[group].items():
            if key not in mine[group]:
                raise KeyError(f"protoseg gave no {group} {key!r}")
            a, b = mine[group][key].double(), ref.double()
            if a.shape != b.shape:
                raise ValueError(f"{group} {key}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            d = float((a - b).abs().max()) if a.numel() else 0.0
            if d > worst or where == "-":
                worst, where = max(worst, d), key
        out[group] = (worst, where)
    return out


def grad_relative(mine: Results, theirs: Results) -> float:
    """||g_protoseg - g_source|| / ||g_source|| over all parameters."""
    num = sum(float((mine["grad"][k] - v).double().pow(2).sum()) for k, v in theirs["grad"].items())
    den = sum(float(v.double().pow(2).sum()) for v in theirs["grad"].values())
    return (num / max(den, 1e-30)) ** 0.5


def print_terms(title: str, mine: Results, theirs: Results) -> None:
    """One table: every loss term of both sides, then the gradient and state maxima."""
    print(f"\n## {title}")
    print(f"{'term':<22}{'protoseg':>14}{'source':>14}{'abs diff':>12}")
    for key, ref in theirs["term"].items():
        a = float(mine["term"][key]) if key in mine["term"] else float("nan")
        print(f"{key:<22}{a:>14.7f}{float(ref):>14.7f}{abs(a - float(ref)):>12.2e}")
    diff = differences(mine, theirs)
    for group in ("grad", "state"):
        value, where = diff[group]
        n = len(theirs[group])
        print(f"{'max ' + group + f' ({n})':<22}{'':>28}{value:>12.2e}  at {where}")
    print(f"{'grad rel. L2':<22}{'':>28}{grad_relative(mine, theirs):>12.2e}")


def _u2pl_rank(rank: int, world: int, port: int, args_path: str) -> None:
    """One process of the multi-process U2PL run (results of rank 0 saved)."""
    from tools.parity import source_side

    spec = torch.load(args_path, weights_only=False)
    with source_side.process_group(rank, world, port):
        res = source_side.u2pl_train(**spec["kwargs"])
    if rank == 0:
        torch.save(res, spec["out"])


def u2pl_world(
    source: Path, state: dict[str, Tensor], batch: Any, draws: Any, world: int
) -> Results:
    """U2PL's step in ``world`` gloo processes, each on the same batch (rank 0's results)."""
    import copy

    import torch.multiprocessing as mp

    from tools.parity import source_side
    from tools.parity.cases import load_initial
    from tools.parity.protoseg_side import (
        NUM_CLASSES,
        OPTIMIZER,
        queue_capacities,
        student_network,
        teacher_network,
    )

    case = CASES["u2pl"]
    method, _ = build_method("u2pl", case.overrides, case.steps_per_epoch)
    load_initial("u2pl", method, state)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "kwargs": {
                "source": source,
                "student": copy.deepcopy(student_network(method)),
                "teacher": copy.deepcopy(_required(teacher_network(method))),
                "batch": batch,
                "boxes": draws["boxes"],
                "contrast_seed": int(draws["contrast_seed"]),
                "epoch": case.step,
                "cfg": source_side.u2pl_config(source, NUM_CLASSES, 10, low_rank=1),
                "queue_sizes": queue_capacities(method),
                "optimizer_settings": OPTIMIZER,
            },
            "out": f"{tmp}/rank0.pt",
        }
        torch.save(spec, f"{tmp}/spec.pt")
        port = source_side.free_port()
        mp.spawn(_u2pl_rank, args=(world, port, f"{tmp}/spec.pt"), nprocs=world, join=True)
        res = torch.load(f"{tmp}/rank0.pt", weights_only=False)
    res.pop("queues")
    res.pop("contra_loss_local")
    return {"term": res["terms"], "grad": res["grads"], "state": res["state"]}


def write_fixture(
    directory: Path,
    name: str,
    state: dict[str, Tensor],
    batch: dict[str, Tensor],
    draws: dict[str, Tensor],
    theirs: Results,
    source: Path,
    source_commit: str | None,
) -> Path:
    """Store the inputs and the source's results of the exact comparison."""
    tensors: dict[str, Tensor] = fixtures.pack_weights(state)
    tensors.update({f"batch.{k}": v for k, v in batch.items() if not k.endswith("_mix")})
    tensors.update({f"draw.{k}": v for k, v in draws.items() if not k.endswith("_mix")})
    for group in ("term", "grad", "state"):
        tensors.update(fixtures.summaries(f"expect.{group}.", theirs[group]))
    found = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    commit = source_commit or (found.stdout.strip() if found.returncode == 0 else "")
    meta = {
        "method": name,
        "overrides": CASES[name].overrides,
        "source": CASES[name].source_hint,
        "source_commit": commit or "unknown (no git checkout; pass --source-commit)",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/source_parity.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch": torch.__version__,
    }
    path = directory / f"{name}.safetensors"
    fixtures.save(path, tensors, meta)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--method", required=True, choices=sorted(CASES))
    parser.add_argument("--source", required=True, type=Path, help="local clone of the source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixture-dir", type=Path, default=None)
    parser.add_argument("--world-size", type=int, default=0, help="u2pl: also run N processes")
    parser.add_argument("--json", type=Path, default=None, help="write the maxima here")
    parser.add_argument(
        "--source-commit",
        default=None,
        help="the source's commit, for a --source that is no git checkout (e.g. git archive)",
    )
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"--source {args.source}: no such directory (a clone of the method's source)")
    name, case = args.method, CASES[args.method]
    torch.manual_seed(args.seed)
    method, _ = build_method(name, case.overrides, case.steps_per_epoch)
    state = initial_state(name, method)
    batch, _ = make_inputs(name, args.seed)
    draws = all_draws(name, method, args.seed)
    report: dict[str, Any] = {}

    def compare(title: str, mine: Results, theirs: Results) -> None:
        print_terms(title, mine, theirs)
        d = differences(mine, theirs)
        report[title] = {
            **{f"max_{g}": d[g][0] for g in d},
            "grad_rel": grad_relative(mine, theirs),
            "terms": {k: [float(mine["term"][k]), float(v)] for k, v in theirs["term"].items()},
        }

    theirs = source_run(name, args.source, state, batch, draws, "exact")
    mine = protoseg_run(name, case.overrides, state, batch, draws)
    compare(f"{name}: exact (protoseg {' '.join(case.overrides)})", mine, theirs)
    if args.fixture_dir is not None:
        path = write_fixture(
            args.fixture_dir, name, state, batch, draws, theirs, args.source, args.source_commit
        )
        print(f"\nfixture: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    # The departures: protoseg's defaults against the source.
    defaults = {
        "fixmatch": ["method.partner_labels=shared_pass"],
        "unimatch": ["method.partner_labels=shared_pass"],
        "cps": ["method.release_passes=false"],
    }
    if name in defaults:
        mine_default = protoseg_run(name, case.overrides + defaults[name], state, batch, draws)
        compare(
            f"{name}: protoseg default ({defaults[name][0]}) vs source, same partner",
            mine_default,
            theirs,
        )
        second = source_run(name, args.source, state, batch, draws, "second_batch")
        compare(
            f"{name}: protoseg default vs source with its own second batch", mine_default, second
        )
    if name == "u2pl" and args.world_size > 1:
        world = args.world_size
        theirs_n = u2pl_world(args.source, state, batch, draws, world)
        compare(f"u2pl: source in {world} processes vs protoseg contrast.weight=1", mine, theirs_n)
        weighted = protoseg_run(
            name, case.overrides + [f"method.contrast.weight={1 / world}"], state, batch, draws
        )
        compare(
            f"u2pl: source in {world} processes vs protoseg contrast.weight=1/{world}",
            weighted,
            theirs_n,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
