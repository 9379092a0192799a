"""docs/adding-a-method.md's example, run through the method contract (so the doc stays true).

The example registers ``entropy_min`` and ``entropy_min+pcr`` for the tests of this file
only; the registries are restored afterwards.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from method_contract import MethodContract, batches

from protoseg.methods import METHOD_CONFIGS, METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"
WARMUP = ("method.warmup_epochs=1",)
PLUG_IN = ("method.warmup_epochs=0", "method.prototypes.sample_grid=8")


@pytest.fixture(scope="module", autouse=True)
def example_method():
    """Execute the doc's first Python block as a module, then unregister what it added."""
    source = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert source is not None, f"{DOC} has no Python block"
    module = types.ModuleType("adding_a_method_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    before = dict(METHODS), dict(METHOD_CONFIGS)
    try:
        exec(compile(source.group(1), str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        METHODS.clear()
        METHODS.update(before[0])
        METHOD_CONFIGS.clear()
        METHOD_CONFIGS.update(before[1])


class TestEntropyMin(MethodContract):
    name, overrides, warmup = "entropy_min", ("method.warmup_epochs=0",), WARMUP


class TestEntropyMinPCR(MethodContract):
    name, overrides, warmup = "entropy_min+pcr", PLUG_IN, WARMUP

    def test_the_plug_in_adds_the_prototype_head_and_losses(self):
        method, _ = self.build()
        assert method.heads == ("linear", "prototype")
        labeled, unlabeled = batches()
        before = method.branch.bank.prototypes.clone()
        out = method.training_step(labeled, unlabeled, step=0)
        assert out["loss_proto_sup"].item() > 0 and "loss_entropy" in out
        method.after_optimizer_step(0)
        assert not torch.equal(method.branch.bank.prototypes, before)

    def test_the_prototype_only_switch_is_refused(self):
        with pytest.raises(ValueError, match="method.linear_head=false"):
            self.build("method.linear_head=false")
