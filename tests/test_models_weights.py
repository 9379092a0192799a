"""Tests of protoseg.models.weights: resolving ``pretrained`` and loading backbone weights."""

from __future__ import annotations

import pathlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import Tensor

from protoseg.models import Backbone, DeepLabV3Plus, ModelError
from protoseg.models import weights as weights_module
from protoseg.models.weights import load_state, read_state_dict, resolve_weights


def _source(name: str = "test_resnet", seed: int = 1) -> dict[str, Tensor]:
    """The full timm model's state dict (classifier included), from a fixed seed."""
    torch.manual_seed(seed)
    model = timm.create_model(name)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model.state_dict()


def _assert_loaded(backbone: Backbone, state: dict[str, Tensor]) -> None:
    """Every trunk tensor equals the file's, under its dotted or flattened name."""
    for key, value in backbone.trunk.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = key if key in state else key.replace("_", ".", 1)
        assert torch.equal(value, state[name]), key


def _save(state: object, path: Path) -> Path:
    """Write ``state`` as safetensors or with torch.save, by suffix."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))  # type: ignore[arg-type]
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_pretrained_from_local_file(tmp_path: Path, suffix: str) -> None:
    state = _source()
    path = _save(state, tmp_path / f"test_resnet{suffix}")
    with warnings.catch_warnings():
        # A full classifier checkpoint loads without a warning: fc.* is expected to be left.
        warnings.simplefilter("error")
        model = DeepLabV3Plus(3, backbone="test_resnet", pretrained=str(path))
    _assert_loaded(model.backbone, state)
    # Loading happens before multi-grid, which the weights do not undo.
    assert model.backbone.layer4_dilations == (4,)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
def test_full_timm_checkpoint_loads_into_trunk(tmp_path: Path, name: str) -> None:
    # EfficientNet trunks drop conv_head/bn2/classifier; ConvNeXt trunks drop head.* and
    # rename stages.N to stages_N.
    state = _source(name)
    path = _save(state, tmp_path / f"{name}.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = Backbone(name, pretrained=str(path), output_stride=16)
    _assert_loaded(backbone, state)


def test_load_state_reports_matched_and_ignored_keys() -> None:
    state = _source()
    trunk = timm.create_model("test_resnet", features_only=True, out_indices=(-4, -2, -1))
    report = load_state(trunk, state, source="mem", arch="test_resnet")
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert report.missing == report.unexpected == ()
    assert set(report.loaded) == set(trunk.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: {"state_dict": s}, id="state_dict"),
        pytest.param(lambda s: {"model": s, "epoch": 3}, id="model"),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="module_prefix"),
        pytest.param(
            lambda s: {"model": {"state_dict": {f"module.{k}": v for k, v in s.items()}}},
            id="nested",
        ),
    ],
)
def test_checkpoint_wrappers_are_unwrapped(
    tmp_path: Path, wrap: Callable[[dict[str, Tensor]], object]
) -> None:
    state = _source()
    path = _save(wrap(state), tmp_path / "checkpoint.pth")
    assert read_state_dict(path).keys() == state.keys()
    _assert_loaded(Backbone("test_resnet", pretrained=str(path)), state)


class _RunsCode:
    """Pickles as a call to Path.touch: unpickling it would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.path,))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "code_ran"
    path = _save({"state_dict": _source(), "hook": _RunsCode(sentinel)}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="weights_only=True") as info:
        Backbone("test_resnet", pretrained=str(path))
    assert not sentinel.exists()
    assert "Unsupported global" in str(info.value)
    assert "torch.save(model.state_dict()" in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_unreadable_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a weights file")
    with pytest.raises(ModelError, match="broken"):
        Backbone("test_resnet", pretrained=str(path))


def test_file_without_tensors(tmp_path: Path) -> None:
    path = _save({"epoch": 3, "best": 0.5}, tmp_path / "meta.pth")
    with pytest.raises(ModelError, match="holds no tensors"):
        read_state_dict(path)


def test_missing_keys_are_warned_by_name(tmp_path: Path) -> None:
    state = _source()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    path = _save(partial, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match="random initialisation") as record:
        backbone = Backbone("test_resnet", pretrained=str(path))
    message = str(record[0].message)
    assert "layer4.0.conv1.weight" in message
    assert "layer3." not in message
    torch.testing.assert_close(
        backbone.trunk.layer3[0].conv1.weight, state["layer3.0.conv1.weight"]
    )


def test_unexpected_keys_of_trunk_modules_are_warned(tmp_path: Path) -> None:
    state = _source()
    # A deeper variant's extra block: its module (layer1) exists in the trunk.
    extra = {**state, "layer1.7.conv1.weight": torch.zeros(3)}
    path = _save(extra, tmp_path / "deeper.pth")
    with pytest.warns(UserWarning, match="layer1.7.conv1.weight") as record:
        Backbone("test_resnet", pretrained=str(path))
    assert "fc.weight" not in str(record[0].message)


def test_missing_key_listing_is_cut(tmp_path: Path) -> None:
    state = _source()
    path = _save({"conv1.0.weight": state["conv1.0.weight"]}, tmp_path / "stem_only.pth")
    with pytest.warns(UserWarning, match=r"and \d+ more"):
        Backbone("test_resnet", pretrained=str(path))


def test_file_with_foreign_keys_is_rejected(tmp_path: Path) -> None:
    state = _source()
    path = _save({f"encoder.{k}": v for k, v in state.items()}, tmp_path / "segmentation.pth")
    with pytest.raises(ModelError, match="does not hold 'test_resnet' weights") as info:
        Backbone("test_resnet", pretrained=str(path))
    assert "encoder.conv1" in str(info.value)


def test_file_of_another_variant_is_rejected(tmp_path: Path) -> None:
    # resnet10t shares test_resnet's key names but not its widths.
    path = _save(_source("resnet10t"), tmp_path / "resnet10t.pth")
    with pytest.raises(ModelError, match="other shapes"):
        Backbone("test_resnet", pretrained=str(path))


def test_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jax.npz"
    path.write_bytes(b"PK")
    with pytest.raises(ModelError, match=".npz"):
        Backbone("test_resnet", pretrained=str(path))


def test_hub_tag_loads_cached_weights_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    pcfg = timm.models.get_pretrained_cfg("test_resnet.r160_in1k")
    # The hub cache layout: refs/main names the snapshot holding the file.
    repo = tmp_path / f"models--{pcfg.hf_hub_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = _source()
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("imagenet", "r160_in1k", "test_resnet.r160_in1k"):
        _assert_loaded(Backbone("test_resnet", pretrained=spec), state)


def test_imagenet_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    # An empty cache guarantees a download is needed; offline mode makes it fail.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        DeepLabV3Plus(21, backbone="test_resnet", pretrained="imagenet")
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "model.pretrained=/path/to/test_resnet.pth" in message
    assert timm.models.get_pretrained_cfg("test_resnet").hf_hub_id in message


def test_unreachable_hub_fails_before_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    probes: list[tuple[str, int]] = []

    def unreachable(host: str, port: int, timeout: float) -> bool:
        probes.append((host, port))
        return False

    monkeypatch.setattr(weights_module, "_reachable", unreachable)
    with pytest.raises(ModelError, match="cannot connect") as info:
        Backbone("resnet18", pretrained="resnet18.tv_in1k")
    assert probes
    assert "model.pretrained=/path/to/resnet18" in str(info.value)
    assert "timm/resnet18.tv_in1k" in str(info.value)


def test_missing_pretrained_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no_such_weights.pth"
    with pytest.raises(ModelError, match="no_such_weights.pth"):
        Backbone("test_resnet", pretrained=str(path))


def test_directory_is_not_a_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is a directory"):
        Backbone("test_resnet", pretrained=str(tmp_path))


@pytest.mark.parametrize(
    ("pretrained", "message"),
    [("resnet18.no_such_tag", "neither an existing"), ("resnet50.tv_in1k", "names weights of")],
)
def test_bad_pretrained_tag(pretrained: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        resolve_weights("resnet18", pretrained)


@pytest.mark.parametrize(
    ("pretrained", "expected"),
    [
        ("", weights_module.WeightSource("resnet18")),
        ("  ", weights_module.WeightSource("resnet18")),
        ("imagenet", weights_module.WeightSource("resnet18", hub=True)),
        ("tv_in1k", weights_module.WeightSource("resnet18.tv_in1k", hub=True)),
        ("resnet18.a1_in1k", weights_module.WeightSource("resnet18.a1_in1k", hub=True)),
    ],
)
def test_resolve_weights(pretrained: str, expected: weights_module.WeightSource) -> None:
    assert resolve_weights("resnet18", pretrained) == expected
