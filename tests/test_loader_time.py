"""benchmarks/loader_time.py: a recipe's loaders timed alone, with a digest of what they drew."""

from __future__ import annotations

import re

import pytest
from helpers import imported_benchmark


@pytest.fixture(scope="module")
def bench():
    """The benchmark script, imported as a module."""
    yield from imported_benchmark("loader_time")


def test_variants_that_must_draw_the_same_batches_show_the_same_digest(
    bench, synthetic_root, capsys
):
    common = [f"data.root={synthetic_root}", "data.crop_size=32", "train.seed=3"]
    common += [
        "data.labeled_split=splits/8/labeled.txt",
        "data.unlabeled_split=splits/8/unlabeled.txt",
    ]
    variants = ["data.cache_images=false", "data.cache_images=true", "train.seed=4"]
    args = ["synthetic/pcr.yaml", *common, "--steps", "3"]
    assert bench.main(args + [arg for v in variants for arg in ("--variant", v)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == variants
    digests = [re.search(r"data (\w+)$", line).group(1) for line in lines]
    # The cache changes nothing drawn; another seed draws other batches.
    assert digests[0] == digests[1] != digests[2]
    assert all(float(re.search(r"([\d.]+) ms per step", line).group(1)) > 0 for line in lines)
