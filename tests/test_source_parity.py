"""protoseg's step of each method against what its authors' own step code computed.

The fixtures in tests/data/parity were written by tools/source_parity.py from the sources'
code (UniMatch's fixmatch.py and unimatch.py, U2PL's train_semi.py, TorchSemiSeg's CPS
train.py; the command and commit are in each file's metadata). Each test replays protoseg's
step on the stored network, batch and random draws and compares every loss term, every
parameter's gradient and the state after one SGD step (BatchNorm statistics, parameters,
U2PL's EMA teacher and queues) to the stored results, within 1e-5 (see
tools/parity/fixtures.py for how large tensors are summarised). Breaking a method on
purpose (one setting each) must make the comparison fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.parity import fixtures
from tools.parity.cases import replay

DATA = Path(__file__).parent / "data" / "parity"
METHODS = ("fixmatch", "unimatch", "u2pl", "cps")
# One deliberate break per method: a threshold, a weight, the release's one-hot quirk, the
# release's forward passes.
BREAKS = {
    "fixmatch": ("method.confidence_threshold=0.5",),
    "unimatch": ("method.fp_weight=0.25",),
    "u2pl": ("method.contrast.release_one_hot=false",),
    "cps": ("method.release_passes=false",),
}


def _differences(method: str, extra: tuple[str, ...] = ()) -> list[fixtures.Difference]:
    tensors, meta = fixtures.load(DATA / f"{method}.safetensors")
    assert meta["method"] == method
    mine = replay(tensors, meta, extra)
    found = []
    for group in ("term", "grad", "state"):
        found += fixtures.compare(f"expect.{group}.", mine[group], tensors)
    return found


@pytest.mark.parametrize("method", METHODS)
def test_step_matches_the_source(method):
    found = _differences(method)
    groups = {d.name.split(".")[0] for d in found}
    assert len(found) > 50 and groups  # terms, every gradient and the state were compared
    bad = [f"{d.name}: {d.max_abs:.2e} > {d.tolerance:.1e}" for d in found if not d.ok]
    assert not bad, f"{method} departs from its source:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("method", METHODS)
def test_a_broken_method_fails_its_fixture(method):
    found = _differences(method, BREAKS[method])
    assert any(not d.ok for d in found), f"{BREAKS[method]} went unnoticed"


def test_fixtures_record_the_command_and_source():
    for method in METHODS:
        _, meta = fixtures.load(DATA / f"{method}.safetensors")
        assert meta["command"].startswith("OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/")
        assert f"--method {method}" in meta["command"]
        assert len(meta["source_commit"]) == 40
