"""MindSpore checkpoint reader/writer and the conversion of the PCR release's checkpoints.

The release's tensor names and shapes are test data (tests/data/release_names_*.txt,
written by tools/release_parity.py from the release's MindSpore network).
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from protoseg.cli import main as cli_main
from protoseg.config import load_config
from protoseg.convert import (
    MindSporeCheckpointError,
    ReleaseConversionError,
    main_convert,
    read_checkpoint,
    write_checkpoint,
)
from protoseg.convert.release import (
    CITYSCAPES_CLASSES,
    RELEASES,
    VOC_CLASSES,
    ReleaseModel,
    _expected_state,
    convert_release,
    convert_tensors,
    protoseg_name,
    release_config,
)
from protoseg.files import MODEL_FORMAT, load_file
from protoseg.inference import load

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# A second, minimal protobuf encoder, so that hand-built files do not rely on the writer.
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor_message(dims: list[int], tensor_type: str, content: bytes) -> bytes:
    encoded = b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    return encoded + _len_field(2, tensor_type.encode()) + _len_field(3, content)


def _value_message(tag: str, tensor: bytes) -> bytes:
    return _len_field(1, _len_field(1, tag.encode()) + _len_field(2, tensor))


def release_names(dataset: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the release's network, from tests/data."""
    rows = []
    for line in (DATA / f"release_names_{dataset}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split()
        rows.append((name, tuple(int(d) for d in shape.split(","))))
    return rows


def _random_release_tensors(dataset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Release-named tensors with values that keep a forward pass finite."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in release_names(dataset):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight":
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif leaf in ("gamma", "moving_variance"):
            value = torch.rand(shape, generator=gen) + 0.5
        else:
            value = torch.randn(shape, generator=gen) * 0.1
        tensors[name] = value
    return tensors


@pytest.fixture(scope="module")
def voc_tensors() -> dict[str, torch.Tensor]:
    """Every tensor of the VOC release network, randomly filled (62.8M values)."""
    return _random_release_tensors("voc")


@pytest.fixture(scope="module")
def voc_converted(voc_tensors: dict[str, torch.Tensor]) -> ReleaseModel:
    """The VOC tensors converted in memory."""
    return convert_tensors(voc_tensors, "voc", "voc.ckpt")


# ---- reader and writer ---------------------------------------------------------------------
def test_round_trip_keeps_names_order_dtypes_and_values(tmp_path: Path) -> None:
    tensors = {
        "z.first": torch.randn(2, 3, 4, 5),
        "a.float16": torch.randn(7).half(),
        "bfloat16": torch.randn(3, 2).bfloat16(),
        "float64": torch.randn(4).double(),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "int16": torch.tensor([-30000, 5], dtype=torch.int16),
        "int32": torch.arange(-5, 5, dtype=torch.int32).reshape(2, 5),
        "int64": torch.tensor([1 << 40, -(1 << 40)]),
        "uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }
    path = write_checkpoint(tensors, tmp_path / "a.ckpt")
    back = read_checkpoint(path)
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_slices_of_one_tensor_are_joined_and_crc_is_checked(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(33, 5, generator=gen), "after": torch.arange(4)}
    path = write_checkpoint(tensors, tmp_path / "s.ckpt", crc=True, slice_bytes=40)
    raw = path.read_bytes()
    assert raw.count(b"big") == math.ceil(33 * 5 * 4 / 40)  # one entry per slice
    back = read_checkpoint(path)
    assert torch.equal(back["big"], tensors["big"]) and torch.equal(back["after"], tensors["after"])

    damaged = bytearray(raw)
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "bad.ckpt").write_bytes(bytes(damaged))
    with pytest.raises(MindSporeCheckpointError, match=r"bad\.ckpt: CRC check failed"):
        read_checkpoint(tmp_path / "bad.ckpt")


def test_reader_accepts_legacy_scalars_packed_dims_and_unknown_fields(tmp_path: Path) -> None:
    # MindSpore 1.x wrote a scalar with dims [0]; proto3-style writers pack repeated ints.
    scalar = _value_message("step", _tensor_message([0], "Int64", (7).to_bytes(8, "little")))
    values = np.arange(6, dtype=np.float32)
    packed_dims = _len_field(1, _varint(2) + _varint(3))
    tensor = (
        packed_dims
        + _varint(9 << 3 | 0)  # unknown varint field
        + _varint(300)
        + _len_field(2, b"Float32")
        + _varint(10 << 3 | 5)  # unknown fixed32 field
        + b"\x00\x01\x02\x03"
        + _len_field(3, values.tobytes())
    )
    group = _varint(12 << 3 | 3) + _varint(1 << 3 | 0) + _varint(5) + _varint(12 << 3 | 4)
    value = (
        _len_field(1, b"w")
        + _varint(11 << 3 | 1)  # unknown fixed64 field
        + bytes(8)
        + group
        + _len_field(2, tensor)
    )
    text = _value_message("note", _tensor_message([1], "str", "abcd".encode("utf-32-le")))
    top_unknown = _varint(7 << 3 | 2) + _varint(3) + b"xyz"
    (tmp_path / "h.ckpt").write_bytes(scalar + top_unknown + _len_field(1, value) + text)
    back = read_checkpoint(tmp_path / "h.ckpt")
    assert list(back) == ["step", "w"]  # the string entry is metadata, not a tensor
    assert back["step"].shape == () and back["step"].item() == 7
    assert torch.equal(back["w"], torch.from_numpy(values).reshape(2, 3))


@pytest.mark.parametrize("cut", [1, 9, 0.5])
def test_truncated_file_is_refused_naming_it(tmp_path: Path, cut: float) -> None:
    path = write_checkpoint({"a": torch.randn(10), "b": torch.randn(3, 3)}, tmp_path / "t.ckpt")
    raw = path.read_bytes()
    keep = int(len(raw) * cut) if isinstance(cut, float) else len(raw) - cut
    (tmp_path / "cut.ckpt").write_bytes(raw[:keep])
    with pytest.raises(MindSporeCheckpointError) as err:
        read_checkpoint(tmp_path / "cut.ckpt")
    assert "cut.ckpt" in str(err.value) and "truncated" in str(err.value)


def test_garbled_empty_and_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(3)}, tmp_path / "model.pth")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases = {
        "model.pth": "not a MindSpore",
        "empty.ckpt": "empty",
        "missing.ckpt": "not found",
    }
    for name, words in cases.items():
        with pytest.raises(MindSporeCheckpointError, match=words) as err:
            read_checkpoint(tmp_path / name)
        assert name in str(err.value)

    # Declared shape and data size disagree.
    bad = _value_message("w", _tensor_message([4], "Float32", bytes(12)))
    (tmp_path / "short.ckpt").write_bytes(bad)
    with pytest.raises(MindSporeCheckpointError, match=r"'w' has 12 bytes .* need 16"):
        read_checkpoint(tmp_path / "short.ckpt")


def test_unsupported_types_are_refused(tmp_path: Path) -> None:
    odd = _value_message("c", _tensor_message([1], "Complex64", bytes(8)))
    (tmp_path / "c.ckpt").write_bytes(odd)
    with pytest.raises(MindSporeCheckpointError, match=r"'c' has type 'Complex64'"):
        read_checkpoint(tmp_path / "c.ckpt")
    map_entry = _len_field(1, _len_field(1, b"emb") + _len_field(3, b""))
    (tmp_path / "m.ckpt").write_bytes(map_entry)
    with pytest.raises(MindSporeCheckpointError, match="MapTensor"):
        read_checkpoint(tmp_path / "m.ckpt")


# ---- the release's names -------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_every_release_tensor_has_a_place_and_fills_the_network(dataset: str) -> None:
    spec = RELEASES[dataset]
    expected = _expected_state(dataset)
    names = release_names(dataset)
    assert all(n.startswith("module.") for n, _ in names)
    placed: dict[str, str] = {}
    for name, shape in names:
        if name == "module.proto_net.proto_list":
            assert shape == (spec.num_classes * spec.prototypes_per_class, 512)
            continue
        key = protoseg_name(name)
        assert key in expected, f"{name} -> {key}"
        assert tuple(expected[key][0]) == shape, name
        assert key not in placed, f"{name} and {placed.get(key)} both map to {key}"
        placed[key] = name
    unfilled = [k for k in expected if k not in placed and not k.endswith("num_batches_tracked")]
    assert unfilled == []
    weights = sum(
        math.prod(s) for n, s in names if not n.endswith(("moving_mean", "moving_variance"))
    )
    bank = spec.num_classes * spec.prototypes_per_class * 512
    if dataset == "voc":
        assert weights - bank == 62_623_189  # the release's published parameter count


def test_conversion_puts_each_value_in_its_place(voc_tensors, voc_converted) -> None:
    state, t = voc_converted.state_dict, voc_tensors
    pairs = {
        "backbone.trunk.conv1.6.weight": "encoder.conv1.6.weight",
        "backbone.trunk.bn1.weight": "encoder.bn1.gamma",
        "backbone.trunk.bn1.bias": "encoder.bn1.beta",
        "backbone.trunk.layer4.2.bn3.running_mean": "encoder.layer4.2.bn3.moving_mean",
        "backbone.trunk.layer3.0.downsample.1.running_var": (
            "encoder.layer3.0.downsample.1.moving_variance"
        ),
        "aspp.pool.1.weight": "decoder.aspp.conv1.1.weight",
        "aspp.branches.0.0.weight": "decoder.aspp.conv2.0.weight",
        "aspp.branches.3.1.running_var": "decoder.aspp.conv5.1.moving_variance",
        "aspp.project.0.weight": "decoder.head.0.weight",
        "low_level.0.bias": "decoder.low_conv.0.bias",
        "classifier.5.weight": "decoder.classifier.5.gamma",
        "classifier.8.bias": "decoder.classifier.8.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], t[f"module.{theirs}"]), ours
    assert int(state["classifier.1.num_batches_tracked"]) == 0
    bank, rows = voc_converted.prototypes, t["module.proto_net.proto_list"]
    assert bank.shape == (21, 4, 512)
    for c, m in [(0, 0), (0, 3), (7, 2), (20, 1)]:
        assert torch.equal(bank[c, m], rows[c * 4 + m])


def test_cityscapes_aux_head_and_bank_are_placed() -> None:
    # Uninitialised memory is enough for placement: only the marked tensors are checked.
    tensors = {n: torch.empty(s) for n, s in release_names("cityscapes")}
    tensors["module.auxor.aux.0.weight"].fill_(0.5)
    tensors["module.auxor.aux.1.moving_variance"].fill_(2.0)
    tensors["module.auxor.aux.4.bias"].copy_(torch.arange(19.0))
    tensors["module.proto_net.proto_list"].copy_(torch.arange(57.0)[:, None].expand(57, 512))
    model = convert_tensors(tensors, "cityscapes")
    assert "aux.0.bias" not in model.state_dict  # the release's aux 3x3 conv has no bias
    assert torch.all(model.state_dict["aux.0.weight"] == 0.5)
    assert torch.all(model.state_dict["aux.1.running_var"] == 2.0)
    assert torch.equal(model.state_dict["aux.4.bias"], torch.arange(19.0))
    assert model.prototypes.shape == (19, 3, 512)
    assert model.prototypes[5, 2, 0] == 5 * 3 + 2
    cfg = model.config
    assert (cfg.eval.mode, cfg.eval.window, cfg.eval.stride) == ("sliding", 769, 513)
    assert cfg.model.aux_head and cfg.data.class_names == list(CITYSCAPES_CLASSES)


def test_unplaceable_wrong_shape_missing_and_wrong_dataset_are_refused(voc_tensors) -> None:
    extra = dict(voc_tensors)
    extra["module.decoder.representation.0.weight"] = torch.zeros(256, 512, 3, 3)
    with pytest.raises(ReleaseConversionError, match=r"v\.ckpt: 1 tensors have no place.*"
                       r"module\.decoder\.representation\.0\.weight"):  # fmt: skip
        convert_tensors(extra, "voc", "v.ckpt")

    reshaped = dict(voc_tensors)
    reshaped["module.decoder.classifier.0.weight"] = torch.zeros(256, 512, 1, 1)
    with pytest.raises(ReleaseConversionError, match=r"classifier\.0\.weight \(256, 512, 1, 1\) "
                       r"\(protoseg \(256, 512, 3, 3\)\)"):  # fmt: skip
        convert_tensors(reshaped, "voc", "v.ckpt")

    missing = {k: v for k, v in voc_tensors.items() if k != "module.encoder.layer2.1.bn2.beta"}
    with pytest.raises(ReleaseConversionError, match=r"missing .*layer2\.1\.bn2\.bias"):
        convert_tensors(missing, "voc", "v.ckpt")

    with pytest.raises(ReleaseConversionError, match="convert it with --dataset voc"):
        convert_tensors(voc_tensors, "cityscapes", "v.ckpt")

    bank = dict(voc_tensors)
    bank["module.proto_net.proto_list"] = torch.zeros(21 * 3, 512)
    with pytest.raises(ReleaseConversionError, match=r"proto_list has shape \(63, 512\)"):
        convert_tensors(bank, "voc", "v.ckpt")

    with pytest.raises(ReleaseConversionError, match="choose one of voc, cityscapes"):
        convert_tensors(voc_tensors, "ade20k")


def test_an_incomplete_file_is_refused_naming_it(tmp_path: Path) -> None:
    write_checkpoint({"module.decoder.classifier.8.bias": torch.zeros(21)}, tmp_path / "p.ckpt")
    with pytest.raises(ReleaseConversionError, match=r"p\.ckpt: .* tensors of .* are missing"):
        convert_release(tmp_path / "p.ckpt", "voc")


def test_release_config_matches_the_shipped_recipes() -> None:
    keys = ["num_classes", "class_names", "mean", "std", "crop_size"]
    for dataset, recipe in (("voc", "voc/pcr.yaml"), ("cityscapes", "cityscapes/pcr.yaml")):
        # By path: an installed protoseg may point its shipped configs at another checkout.
        ours, shipped = release_config(dataset), load_config(CONFIGS / recipe)
        for key in keys:
            assert getattr(ours.data, key) == pytest.approx(getattr(shipped.data, key)), key
        for key in ("backbone", "output_stride", "multi_grid", "aux_head", "aspp_dilations"):
            assert getattr(ours.model, key) == getattr(shipped.model, key), key
        assert ours.method.prototypes.per_class == shipped.method.prototypes.per_class
        assert ours.method.confidence_threshold == shipped.method.confidence_threshold
        assert (ours.eval.mode, ours.eval.all_heads) == (shipped.eval.mode, shipped.eval.all_heads)
        assert ours.model.pretrained == ""  # loading a converted file downloads nothing
    assert release_config("voc").data.class_names == list(VOC_CLASSES)


# ---- the model file ------------------------------------------------------------------------
def test_converted_release_file_loads_and_predicts(tmp_path: Path, voc_tensors, capsys) -> None:
    ckpt = write_checkpoint(voc_tensors, tmp_path / "best.ckpt")
    out = tmp_path / "model.pt"
    # As a user runs it: the command line.
    assert cli_main(["convert", "release", str(ckpt), "--dataset", "voc", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "70.78 / 74.65 / 76.77 / 78.70 / 80.18" in printed and str(out) in printed
    assert "62,623,189 network parameters" in printed

    data = load_file(out)
    assert data["format"] == MODEL_FORMAT and data["class_names"] == list(VOC_CLASSES)
    head = data["heads"]["prototype"]
    assert head["options"] == {"num_classes": 21, "per_class": 4, "dim": 512, "temperature": 0.1}
    assert head["state"]["initialized"].item() is True
    assert data["converted_from"] == {
        "release": "HeimingX/semi_seg_proto",
        "dataset": "voc",
        "checkpoint": str(ckpt),
    }

    predictor = load(out, head="prototype")
    bank = predictor.model.bank
    rows = voc_tensors["module.proto_net.proto_list"]
    assert torch.equal(bank.prototypes.reshape(84, 512), rows)
    image = np.random.default_rng(0).integers(0, 256, (41, 57, 3), dtype=np.uint8)
    mask = predictor.predict(image)
    assert mask.shape == (41, 57) and mask.dtype == np.uint8 and mask.max() < 21
    linear = predictor.model.network(predictor.preprocess(image))["logits"]
    assert linear.shape == (1, 21, 41, 57) and torch.isfinite(linear).all()


def test_main_convert_refuses_before_converting(tmp_path: Path) -> None:
    src = tmp_path / "best.ckpt"
    src.write_bytes(b"not read before the checks")
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(ReleaseConversionError, match="already exists; pass --force"):
        main_convert(str(src), "voc", str(existing), force=False)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ReleaseConversionError, match="is the input checkpoint itself"):
        main_convert(str(src), "voc", str(tmp_path / "." / "best.ckpt"), force=True)
    with pytest.raises(ReleaseConversionError, match="is a folder"):
        main_convert(str(src), "voc", str(tmp_path), force=True)
    with pytest.raises(ReleaseConversionError, match="not found"):
        main_convert(str(tmp_path / "nope.ckpt"), "voc", str(tmp_path / "o.pt"), force=True)
    with pytest.raises(ReleaseConversionError, match="unknown release dataset"):
        main_convert(str(src), "VOC2012", str(tmp_path / "o.pt"), force=True)
    # With --force the checks pass and the (garbled) input itself is what fails.
    with pytest.raises(MindSporeCheckpointError, match="best.ckpt"):
        main_convert(str(src), "voc", str(existing), force=True)
    assert existing.read_bytes() == b"keep me"


def test_crc_of_the_writer_is_mindspores_layout(tmp_path: Path) -> None:
    path = write_checkpoint({"a": torch.ones(2)}, tmp_path / "c.ckpt", crc=True)
    raw = path.read_bytes()
    assert raw[-17:-10] == b"crc_num"
    assert int.from_bytes(raw[-10:], "big") == zlib.crc32(raw[:-17])
