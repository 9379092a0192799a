"""Read and write MindSpore ``.ckpt`` checkpoints without MindSpore.

A ``.ckpt`` file is one serialized protobuf message (MindSpore's ``checkpoint.proto``)::

    message Checkpoint {
        message Value {
            required string tag = 1;
            oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; }
        }
        repeated Value value = 1;
    }
    message TensorProto {
        repeated int64 dims = 1;
        required string tensor_type = 2;     // "Float32", "Int64", ...
        required bytes tensor_content = 3;   // raw little-endian element bytes
    }

MindSpore details the reader follows: a tensor larger than its slice limit is written as
several consecutive ``Value`` entries with the same tag, whose contents are concatenated;
a scalar has ``dims`` [] (MindSpore 2.x) or [0] (1.x); MindSpore 2.x may append a
``b"crc_num"`` marker and a 10-byte big-endian CRC-32 of the message after it.

Only the protobuf wire format is decoded here (varints and length-delimited fields), so
neither MindSpore nor the protobuf package is needed. Unknown fields are skipped.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from protoseg.files import CheckpointError, atomic_write

__all__ = [
    "MINDSPORE_DTYPES",
    "MindSporeCheckpointError",
    "read_checkpoint",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

# MindSpore's tensor_type strings (str() of its dtypes) and the matching torch dtypes.
MINDSPORE_DTYPES: dict[str, torch.dtype] = {
    "Bool": torch.bool,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "UInt16": torch.uint16,
    "UInt32": torch.uint32,
    "UInt64": torch.uint64,
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float32": torch.float32,
    "Float64": torch.float64,
}
_TORCH_TO_MINDSPORE = {dtype: name for name, dtype in MINDSPORE_DTYPES.items()}

# Protobuf wire types.
_VARINT, _FIXED64, _LEN, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_CRC_MARKER = b"crc_num"
_CRC_TRAILER = len(_CRC_MARKER) + 10
# MindSpore splits a tensor above 512 MiB into several entries; the writer does the same.
DEFAULT_SLICE_BYTES = 512 * 1024 * 1024


class MindSporeCheckpointError(CheckpointError):
    """A MindSpore checkpoint file is missing, damaged, or holds something we cannot read."""


class _WireError(Exception):
    """A malformed protobuf encoding at a byte offset (turned into MindSporeCheckpointError)."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass
class _RawTensor:
    dims: list[int]
    tensor_type: str
    content: list[memoryview]


# ---- decoding ------------------------------------------------------------------------------
def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; return (value, position after it)."""
    result = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _WireError("the data ends inside a varint", start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        # A 64-bit value takes at most 10 bytes; more means the bytes are not protobuf.
        if shift >= 70:
            raise _WireError("a varint is longer than 10 bytes", start)


def _skip_group(buf: memoryview, pos: int, end: int, field: int) -> int:
    """Skip a (deprecated) group whose start tag has been read; return the position after it."""
    for number, wire, _value, after in _fields(buf, pos, end, in_group=True):
        if wire == _END_GROUP:
            if number != field:
                raise _WireError(f"group {field} closed by an end tag of field {number}", after)
            return after
    raise _WireError(f"group {field} is never closed", pos)


def _fields(
    buf: memoryview, pos: int, end: int, in_group: bool = False
) -> Iterator[tuple[int, int, int | tuple[int, int], int]]:
    """Yield (field number, wire type, value, position after) for each field in buf[pos:end].

    The value is the integer for varint and fixed-width fields and (start, stop) for
    length-delimited ones. Groups are skipped whole; an end-group tag is yielded only
    inside a group (``in_group``), where it ends the iteration's useful part.
    """
    while pos < end:
        tag_pos = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0 is not valid protobuf", tag_pos)
        value: int | tuple[int, int]
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > end:
                raise _WireError("the data ends inside a fixed-width field", tag_pos)
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise _WireError(
                    f"field {number} claims {length} bytes but only {end - pos} remain", tag_pos
                )
            value = (pos, pos + length)
            pos += length
        elif wire == _START_GROUP:
            pos = _skip_group(buf, pos, end, number)
            continue
        elif wire == _END_GROUP:
            if not in_group:
                raise _WireError(f"end-group tag of field {number} outside a group", tag_pos)
            yield number, wire, 0, pos
            return
        else:
            raise _WireError(f"invalid wire type {wire} for field {number}", tag_pos)
        yield number, wire, value, pos


def _signed64(value: int) -> int:
    """Protobuf int64 is encoded as the two's complement varint of its 64-bit pattern."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_tensor(buf: memoryview, start: int, end: int) -> _RawTensor:
    """Decode a TensorProto message in buf[start:end]."""
    dims: list[int] = []
    tensor_type: str | None = None
    content: memoryview | None = None
    for number, wire, value, _ in _fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            dims.append(_signed64(value))  # type: ignore[arg-type]
        elif number == 1 and wire == _LEN:
            # Packed encoding (proto3 style); MindSpore writes unpacked, both are valid.
            lo, hi = value  # type: ignore[misc]
            while lo < hi:
                dim, lo = _read_varint(buf, lo, hi)
                dims.append(_signed64(dim))
        elif number == 2 and wire == _LEN:
            lo, hi = value  # type: ignore[misc]
            tensor_type = _utf8(buf, lo, hi)
        elif number == 3 and wire == _LEN:
            lo, hi = value  # type: ignore[misc]
            content = buf[lo:hi]
    if tensor_type is None or content is None:
        missing = "tensor_type" if tensor_type is None else "tensor_content"
        raise _WireError(f"a TensorProto has no {missing}", start)
    if any(d < 0 for d in dims):
        raise _WireError(f"a TensorProto has negative dims {dims}", start)
    return _RawTensor(dims, tensor_type, [content])


def _utf8(buf: memoryview, lo: int, hi: int) -> str:
    try:
        return bytes(buf[lo:hi]).decode("utf-8")
    except UnicodeDecodeError:
        raise _WireError("a string field is not valid UTF-8", lo) from None


def _parse_value(buf: memoryview, start: int, end: int) -> tuple[str, _RawTensor]:
    """Decode a Checkpoint.Value message: (tag, tensor)."""
    tag: str | None = None
    tensor: _RawTensor | None = None
    has_map = False
    for number, wire, value, _ in _fields(buf, start, end):
        if wire != _LEN:
            continue
        lo, hi = value  # type: ignore[misc]
        if number == 1:
            tag = _utf8(buf, lo, hi)
        elif number == 2:
            tensor = _parse_tensor(buf, lo, hi)
        elif number == 3:
            has_map = True
    if tag is None:
        raise _WireError("an entry has no name (tag)", start)
    if tensor is None:
        what = "a MapTensor, which protoseg does not read" if has_map else "no tensor"
        raise _WireError(f"entry {tag!r} holds {what}", start)
    return tag, tensor


def _parse_checkpoint(buf: memoryview) -> dict[str, _RawTensor]:
    """Decode the top-level Checkpoint message, joining consecutive slices of one tensor."""
    entries: dict[str, _RawTensor] = {}
    previous: str | None = None
    for number, wire, value, _ in _fields(buf, 0, len(buf)):
        if number != 1 or wire != _LEN:
            continue
        lo, hi = value  # type: ignore[misc]
        tag, tensor = _parse_value(buf, lo, hi)
        if tag == previous:
            # A slice of the tensor before: same name, next part of its bytes.
            entries[tag].content.extend(tensor.content)
            continue
        if tag in entries:
            raise _WireError(f"tensor {tag!r} appears twice, not in consecutive slices", lo)
        entries[tag] = tensor
        previous = tag
    return entries


def _strip_crc(data: memoryview, path: Path) -> memoryview:
    """Remove and verify MindSpore 2.x's optional CRC trailer."""
    if len(data) < _CRC_TRAILER or bytes(data[-_CRC_TRAILER:-10]) != _CRC_MARKER:
        return data
    body = data[:-_CRC_TRAILER]
    stored = int.from_bytes(data[-10:], "big")
    if zlib.crc32(body) != stored:
        raise MindSporeCheckpointError(
            f"{path}: CRC check failed: the file is damaged (incomplete download or copy); "
            "download it again"
        )
    return body


def _to_tensor(name: str, raw: _RawTensor, path: Path) -> Tensor:
    """Build a torch tensor from decoded bytes, checking the element count against dims."""
    dtype = MINDSPORE_DTYPES[raw.tensor_type]
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = sum(len(part) for part in raw.content)
    dims = raw.dims
    # A scalar is dims [] in MindSpore 2.x and [0] with one element in 1.x.
    if dims == [0] and nbytes == itemsize:
        dims = []
    count = math.prod(dims)
    if nbytes != count * itemsize:
        raise MindSporeCheckpointError(
            f"{path}: tensor {name!r} has {nbytes} bytes of data but its shape {tuple(dims)} "
            f"and type {raw.tensor_type} need {count * itemsize}: the file is damaged; "
            "download it again"
        )
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    data = bytearray(nbytes)
    offset = 0
    for part in raw.content:
        data[offset : offset + len(part)] = part
        offset += len(part)
    # bytearray is writable, so the tensor owns mutable memory without another copy.
    return torch.frombuffer(data, dtype=dtype).reshape(dims)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a MindSpore ``.ckpt`` file into a ``{name: tensor}`` dict, in file order.

    String entries (MindSpore's ``append_dict`` metadata) are skipped. Raises
    MindSporeCheckpointError, naming the file, when it is missing, truncated, damaged,
    encrypted, or holds a dtype or MapTensor that protoseg cannot represent.
    """
    path = Path(path)
    if not path.is_file():
        raise MindSporeCheckpointError(f"MindSpore checkpoint not found: {path}")
    data = memoryview(path.read_bytes())
    if not len(data):
        raise MindSporeCheckpointError(f"{path}: the file is empty; download it again")
    data = _strip_crc(data, path)
    try:
        entries = _parse_checkpoint(data)
    except _WireError as exc:
        raise MindSporeCheckpointError(
            f"{path}: not a readable MindSpore checkpoint ({exc} at byte {exc.offset} of "
            f"{len(data)}). The file is truncated or damaged (download it again), encrypted "
            "(decrypt it with MindSpore first), or not a MindSpore .ckpt file"
        ) from None
    if not entries:
        raise MindSporeCheckpointError(
            f"{path}: holds no tensors; it is not a MindSpore .ckpt file (a PyTorch .pt/.pth "
            "file is loaded with protoseg's own commands, not converted)"
        )
    tensors: dict[str, Tensor] = {}
    for name, raw in entries.items():
        if raw.tensor_type == "str":
            log.info("%s: skipping string entry %r", path, name)
            continue
        if raw.tensor_type not in MINDSPORE_DTYPES:
            known = ", ".join(MINDSPORE_DTYPES)
            raise MindSporeCheckpointError(
                f"{path}: tensor {name!r} has type {raw.tensor_type!r}, which protoseg cannot "
                f"read (supported: {known})"
            )
        tensors[name] = _to_tensor(name, raw, path)
    return tensors


# ---- encoding ------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    """Encode a non-negative integer (or an int64 as its 64-bit pattern) as a varint."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def _value_pieces(
    tag: str, dims: list[int], tensor_type: str, content: memoryview
) -> tuple[bytes, memoryview]:
    """One top-level ``Checkpoint.value`` entry as (header bytes, content), content uncopied.

    Dims are written unpacked, as MindSpore's proto2 schema does.
    """
    tensor_head = (
        b"".join(_key(1, _VARINT) + _varint(d) for d in dims)
        + _len_field(2, tensor_type.encode("utf-8"))
        + _key(3, _LEN)
        + _varint(len(content))
    )
    tensor_len = len(tensor_head) + len(content)
    value_head = _len_field(1, tag.encode("utf-8")) + _key(2, _LEN) + _varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return _key(1, _LEN) + _varint(value_len) + value_head + tensor_head, content


def write_checkpoint(
    tensors: Mapping[str, Tensor],
    path: str | Path,
    crc: bool = False,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
) -> Path:
    """Write ``{name: tensor}`` as a MindSpore ``.ckpt`` file that MindSpore can load.

    Tensors larger than ``slice_bytes`` are split into consecutive entries as MindSpore
    does; ``crc`` appends MindSpore 2.x's CRC trailer. The file is written atomically.
    """
    if slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes}")
    for name, tensor in tensors.items():
        if tensor.dtype not in _TORCH_TO_MINDSPORE:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no MindSpore type")

    def write(handle: BinaryIO) -> None:
        checksum = 0
        for name, tensor in tensors.items():
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            # A byte view of the tensor's own memory: a 250 MB model is not copied again.
            content = flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")
            size = flat.element_size()
            # Slices end on element boundaries so that each holds whole values.
            step = max(1, slice_bytes // size) * size
            for start in range(0, max(len(content), 1), step):
                for piece in _value_pieces(
                    name,
                    list(tensor.shape),
                    _TORCH_TO_MINDSPORE[tensor.dtype],
                    content[start : start + step],
                ):
                    handle.write(piece)
                    if crc:
                        checksum = zlib.crc32(piece, checksum)
        if crc:
            handle.write(_CRC_MARKER + checksum.to_bytes(10, "big"))

    return atomic_write(path, write)
