"""Shared fixtures: offline hub access, a small synthetic dataset, the real U2PL split files."""

from __future__ import annotations

import os

# Set before anything imports timm / huggingface_hub: tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import protoseg.methods  # noqa: E402, F401  (the registry protoseg.config resolves method.name by)
from protoseg.data import generate_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic VOC-layout dataset: 48 train, 12 val images of ~64 px, 8 labelled."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(
        root, num_train=48, num_val=12, image_size=64, label_counts=(8,), seed=0
    )


@pytest.fixture
def shared_splits() -> Path:
    """The real U2PL split files in ../shared/splits (skipped when that folder is absent)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "splits"
    if not path.is_dir():
        pytest.skip(f"{path} not found (real split files are optional test data)")
    return path
