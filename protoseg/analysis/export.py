"""Export the deployed network (linear head) to ONNX or TorchScript, plus a JSON sidecar.

The exported module takes a normalised float32 (B, 3, H, W) RGB batch, i.e.
``(pixel / 255 - mean) / std`` with the mean and std written to the sidecar, and returns
logits (B, C, H, W) at the input size; batch, height and width are dynamic. ONNX uses
the classic TorchScript-based exporter (``dynamo=False``): the torch.export-based one
needs the ``onnxscript`` package, which is not a dependency.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from protoseg.files import atomic_write
from protoseg.inference import Predictor
from protoseg.outputs import OutputError, check_outputs, protect, same_file

EXPORT_FORMAT = "protoseg-export/1"
FORMATS = ("onnx", "torchscript")
# Sizes the trace is taken at and checked at: different, odd-ish, small (fast on CPU).
TRACE_SIZE = (64, 96)
CHECK_SIZE = (83, 57)
CHECK_ATOL = 1e-3


class LogitsOnly(nn.Module):
    """Wrap a protoseg network so that it returns the logits tensor alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, C, H, W) logits."""
        out = self.model(images)
        return out["logits"] if isinstance(out, Mapping) else out


def _deployable(predictor: Predictor) -> nn.Module:
    """The predictor's network on the CPU in float32, without moving the predictor's own copy."""
    model = predictor.model
    # Tracing on the CPU in float32 keeps the file independent of the build machine.
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return LogitsOnly(model).eval()


def sidecar_path(path: str | Path) -> Path:
    """Where the JSON sidecar of an exported file goes: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_sidecar(
    predictor: Predictor, path: str | Path, fmt: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write class names, palette, mean and std next to an exported model file."""
    num_classes = predictor.config.data.num_classes
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": Path(path).name,
        "num_classes": num_classes,
        "class_names": list(predictor.class_names),
        "palette": [list(map(int, c)) for c in predictor.palette[: max(num_classes, 1)]],
        "mean": [float(v) for v in predictor.mean],
        "std": [float(v) for v in predictor.std],
        "input": "float32 (B, 3, H, W) RGB, (pixel / 255 - mean) / std",
        "output": "float32 (B, num_classes, H, W) logits; argmax over dim 1 gives class ids",
        **(extra or {}),
    }
    target = sidecar_path(path)
    text = (json.dumps(info, indent=2) + "\n").encode("utf-8")
    return atomic_write(target, lambda handle: handle.write(text))


def _sample(size: tuple[int, int], batch: int = 1, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator)


def _check_close(name: str, got: Tensor, want: Tensor, path: Path) -> None:
    if got.shape != want.shape:
        raise RuntimeError(
            f"{path}: exported model returns shape {tuple(got.shape)} where "
            f"PyTorch gives {tuple(want.shape)}; export with another opset or "
            "use --format torchscript"
        )
    err = float((got - want).abs().max())
    if err > CHECK_ATOL:
        raise RuntimeError(
            f"{path}: {name} logits differ from PyTorch by {err:.2e} "
            f"(> {CHECK_ATOL}) at input {tuple(want.shape[-2:])}; the export "
            "is not shape-generic for this network"
        )


def export_torchscript(predictor: Predictor, path: str | Path) -> Path:
    """Trace the network to TorchScript and check it at a second input size and batch."""
    path = Path(path)
    module = _deployable(predictor)
    check_free_space(path, module)
    with torch.no_grad(), warnings.catch_warnings():
        # jit.trace is deprecated upstream but remains the loadable-without-Python format.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, _sample(TRACE_SIZE), check_trace=False)
        # Serialised and checked in memory, then written by Python: torch's own file writer
        # aborts the process on a full disk, leaving a truncated file.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        data = buffer.getvalue()
        reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        check = _sample(CHECK_SIZE, batch=2, seed=1)
        _check_close("TorchScript", reloaded(check), module(check), path)
    atomic_write(path, lambda handle: handle.write(data))
    write_sidecar(predictor, path, "torchscript")
    return path


def export_onnx(
    predictor: Predictor, path: str | Path, opset: int = 17, verify: bool = True
) -> Path:
    """Export to ONNX with dynamic batch/height/width; check with onnxruntime when installed."""
    if importlib.util.find_spec("onnx") is None:
        raise ValueError(
            "ONNX export needs the onnx package: pip install 'protoseg[export]' "
            "(or --format torchscript, which needs nothing more)"
        )
    path = Path(path)
    module = _deployable(predictor)
    check_free_space(path, module)
    axes = {0: "batch", 2: "height", 3: "width"}
    # Exported and checked in memory, then written through a temporary file: only a
    # complete, verified file ever lands at ``path``, also on a full disk.
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (_sample(TRACE_SIZE),),
            buffer,  # type: ignore[arg-type]  # the classic exporter takes file objects
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"images": axes, "logits": axes},
        )
    data = buffer.getvalue()
    if verify:
        _verify_onnx(module, data, path)
    atomic_write(path, lambda handle: handle.write(data))
    write_sidecar(predictor, path, "onnx", {"opset": opset})
    return path


def _verify_onnx(module: nn.Module, data: bytes, path: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn(
            f"{path}: onnxruntime is not installed, so the export was not checked "
            "(pip install 'protoseg[export]')",
            stacklevel=3,
        )
        return
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    check = _sample(CHECK_SIZE, batch=2, seed=1)
    (got,) = session.run(["logits"], {"images": check.numpy()})
    with torch.no_grad():
        _check_close("ONNX", torch.from_numpy(got), module(check), path)


def check_free_space(path: Path, module: nn.Module) -> None:
    """Refuse an export up front when the folder lacks room for the weights (plus a margin):
    some exporters abort the process on a full disk instead of raising."""
    need = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    need = int(need * 1.2) + (1 << 20)
    folder = path.parent if str(path.parent) else Path(".")
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(
            f"--out {path}: {folder} has {free / 2**20:.1f} MiB free, the export needs about "
            f"{need / 2**20:.1f} MiB; free some space or choose another folder"
        )


def check_export_target(checkpoint: str | Path, out: str | Path, force: bool = False) -> None:
    """Refuse an export that would replace its own model file, or (unless ``force``, the
    CLI's --overwrite) a file that exists, and an output folder that cannot be written."""
    out, checkpoint = Path(out), Path(checkpoint)
    if same_file(out, checkpoint) or same_file(sidecar_path(out), checkpoint):
        raise OutputError(
            f"--out {out} is the model file being exported; choose another file name "
            "(the trained model is never replaced)"
        )
    check_outputs([out, sidecar_path(out)], protect([checkpoint], "model file"), force)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")


def export_model(predictor: Predictor, fmt: str, path: str | Path, opset: int = 17) -> Path:
    """Export in ``fmt`` ('onnx' or 'torchscript'); returns the model file's path."""
    if fmt == "onnx":
        return export_onnx(predictor, path, opset)
    if fmt == "torchscript":
        return export_torchscript(predictor, path)
    raise ValueError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
