"""Encoder: any timm CNN with ``features_only`` support, dilated to the configured output stride.

The release's encoder is timm's ``resnet101s`` (deep stem of width 64) at output stride 8,
with layer4 multi-grid dilations (4, 8, 16); ``Backbone`` rebuilds it from ``ModelConfig``
and also accepts any other timm CNN that exposes stride-4/16/32 feature levels.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import Tensor, nn

from protoseg.config import ModelConfig

_log = logging.getLogger(__name__)

# Negative indices pick (stride 4, stride 16, last) on nets with 5 feature levels (ResNets,
# EfficientNets: same as (1, 3, 4)) and on nets with 4 levels (ConvNeXt) alike.
OUT_INDICES = (-4, -2, -1)
# DeepLab's multi-grid unit rates for the blocks of layer4, scaled by layer4's base dilation.
MULTI_GRID = (1, 2, 4)
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".npz")
_HUB_PROBE_TIMEOUT_S = 5.0


class ModelError(ValueError):
    """A model cannot be built from its configuration."""


class Backbone(nn.Module):
    """A timm feature trunk returning (stride-4, layer3, last) feature maps."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.name = cfg.backbone
        self.output_stride = cfg.output_stride
        self.trunk = _build_trunk(cfg)
        info = self.trunk.feature_info
        self.channels: tuple[int, int, int] = tuple(info.channels())  # type: ignore[assignment]
        self.reductions: tuple[int, int, int] = tuple(info.reduction())  # type: ignore[assignment]
        if self.reductions[0] != 4 or self.reductions[-1] != cfg.output_stride:
            raise ModelError(
                f"backbone {cfg.backbone!r} gives feature strides {self.reductions}; DeepLabv3+ "
                f"needs stride 4 low-level features and output stride {cfg.output_stride} "
                "(the net may not support dilation: try model.output_stride=32)"
            )
        self.layer4_dilations: tuple[int, ...] | None = (
            _apply_multi_grid(self.trunk) if cfg.multi_grid else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the low-level, layer3 (aux head) and last feature maps."""
        low, mid, high = self.trunk(x)
        return low, mid, high


def _build_trunk(cfg: ModelConfig) -> nn.Module:
    """Create the timm features_only trunk, with weights as ``cfg.pretrained`` asks."""
    arch = split_model_name_tag(cfg.backbone)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model.backbone {cfg.backbone!r}.{hint} List timm's CNNs with "
            f"timm.list_models('*{arch[:6]}*')."
        )
    model_name, file = _resolve_weights(cfg.backbone, cfg.pretrained)
    pretrained = bool(cfg.pretrained.strip())
    kwargs: dict[str, object] = {
        "features_only": True,
        "out_indices": OUT_INDICES,
        "pretrained": pretrained,
    }
    # Nets without dilation support reject the argument even at its default value.
    if cfg.output_stride != 32:
        kwargs["output_stride"] = cfg.output_stride
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    elif pretrained:
        _fail_fast_if_hub_unreachable(model_name)

    with _capture_missing_keys() as missing:
        try:
            trunk = timm.create_model(model_name, **kwargs)
        except OSError as e:
            if pretrained and file is None:
                raise _download_error(model_name, e) from e
            raise ModelError(f"could not read pretrained weights {str(file)!r}: {e}") from e
        except (RuntimeError, TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
            what = f"load {str(file)!r} into" if file is not None else "build"
            raise ModelError(
                f"timm could not {what} backbone {model_name!r} (features_only, "
                f"output_stride={cfg.output_stride}): {type(e).__name__}: {e}"
            ) from e

    if file is not None:
        # timm loads features_only trunks non-strictly, so a file with foreign key names
        # (e.g. a whole segmentation checkpoint) would otherwise leave the trunk random.
        # BatchNorm fills in a missing counter itself; it is not a weight.
        trunk_keys = {k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")}
        bad = [k for k in missing if k in trunk_keys]
        if bad:
            raise ModelError(
                f"{str(file)!r} does not hold {arch!r} weights: {len(bad)} of the trunk's "
                f"{len(trunk_keys)} tensors are missing from it (e.g. {', '.join(bad[:3])}); "
                f"save a timm {arch!r} state_dict with these key names"
            )
    return trunk


def _resolve_weights(backbone: str, pretrained: str) -> tuple[str, Path | None]:
    """Map ``model.pretrained`` to (timm model name to create, local weights file or None)."""
    spec = pretrained.strip()
    if not spec or spec.lower() == "imagenet":
        # timm picks the name's default pretrained tag itself.
        return backbone, None
    path = Path(spec).expanduser()
    if path.is_file():
        return backbone, path
    if path.exists():
        raise ModelError(f"model.pretrained={spec!r} is a directory, not a weights file")
    if "/" in spec or os.sep in spec or spec.startswith("~") or spec.endswith(_WEIGHT_SUFFIXES):
        raise ModelError(f"model.pretrained: weights file {spec!r} does not exist")

    arch = split_model_name_tag(backbone)[0]
    name = spec if "." in spec else f"{arch}.{spec}"
    tag_arch = split_model_name_tag(name)[0]
    if tag_arch != arch:
        raise ModelError(
            f"model.pretrained={spec!r} names weights of {tag_arch!r} but model.backbone "
            f"is {backbone!r}"
        )
    try:
        known = get_pretrained_cfg(name, allow_unregistered=False) is not None
    except RuntimeError:
        known = False
    if not known:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ModelError(
            f"model.pretrained={spec!r} is neither an existing weights file nor a timm "
            f"pretrained tag of {arch!r} (tags: {', '.join(tags) or 'none'})"
        )
    return name, None


def _download_error(model_name: str, err: BaseException) -> ModelError:
    """Build the error that tells how to supply hub weights by hand."""
    pcfg = get_pretrained_cfg(model_name)
    arch, tag = split_model_name_tag(model_name)
    full = f"{arch}.{tag or (pcfg.tag if pcfg else '')}".rstrip(".")
    if pcfg is not None and pcfg.hf_hub_id:
        source = (
            f"the Hugging Face hub id {pcfg.hf_hub_id!r} "
            f"(https://huggingface.co/{pcfg.hf_hub_id.split('@')[0]}, file model.safetensors "
            "or pytorch_model.bin)"
        )
    elif pcfg is not None and pcfg.url:
        source = f"{pcfg.url}"
    else:
        source = "the timm release that provides them"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ModelError(
        f"could not fetch the pretrained weights {full!r} for backbone {arch!r} ({reason}). "
        f"Download them where there is network access from {source} and pass the local file: "
        f"model.pretrained=/path/to/{arch}.pth (or .safetensors)"
    )


def _fail_fast_if_hub_unreachable(model_name: str) -> None:
    """Raise before timm's download when uncached hub weights cannot be fetched."""
    # huggingface_hub retries a dead network for about a minute before giving up; with
    # HF_HUB_OFFLINE or a proxy configured we leave the decision to it.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    proxy_vars = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in proxy_vars):
        return
    pcfg = get_pretrained_cfg(model_name)
    if pcfg is None or not pcfg.hf_hub_id:
        return
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return
    repo_id, _, revision = pcfg.hf_hub_id.partition("@")
    for filename in (pcfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        if filename and isinstance(
            try_to_load_from_cache(repo_id, filename, revision=revision or None), str
        ):
            return
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if not _reachable(host, port, _HUB_PROBE_TIMEOUT_S):
        raise _download_error(model_name, OSError(f"cannot connect to {host}:{port}"))


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _capture_missing_keys() -> Iterator[list[str]]:
    """Collect the missing keys timm reports (at INFO level) while loading weights."""
    logger = logging.getLogger("timm.models._builder")
    found: list[str] = []
    quiet_below = logger.getEffectiveLevel()
    pattern = re.compile(r"Missing keys \((.*)\) discovered", re.S)

    def grab(record: logging.LogRecord) -> bool:
        match = pattern.match(record.getMessage())
        if match:
            found.extend(k.strip() for k in match.group(1).split(","))
        # The level is lowered only to see this record; keep others as quiet as before.
        return record.levelno >= quiet_below

    old_level = logger.level
    logger.addFilter(grab)
    logger.setLevel(min(logging.INFO, quiet_below))
    try:
        yield found
    finally:
        logger.removeFilter(grab)
        logger.setLevel(old_level)


def _apply_multi_grid(trunk: nn.Module) -> tuple[int, ...] | None:
    """Set layer4's 3x3 dilations to base * (1, 2, 4) on ResNet-like trunks; return them."""
    layer4 = getattr(trunk, "layer4", None)
    blocks = list(layer4.children()) if isinstance(layer4, nn.Module) else []
    convs = [getattr(block, "conv2", None) for block in blocks]
    if not convs or not all(_is_square_odd_conv(c) for c in convs):
        _log.info("multi_grid skipped: backbone has no ResNet-style layer4 with 3x3 conv2")
        return None
    # timm gives every block after the first the layer's dilation (the first keeps the
    # previous layer's); 1 means layer4 is strided (output stride 32) and stays as it is.
    base = convs[-1].dilation[0]
    if base == 1:
        return None
    dilations = []
    for i, conv in enumerate(convs):
        # Layers deeper than three blocks repeat the grid.
        d = base * MULTI_GRID[i % len(MULTI_GRID)]
        conv.dilation = (d, d)
        conv.padding = (d * (conv.kernel_size[0] // 2),) * 2
        dilations.append(d)
    return tuple(dilations)


def _is_square_odd_conv(module: object) -> bool:
    """Whether ``module`` is a Conv2d with a square, odd kernel > 1 and zero padding."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size[0] == module.kernel_size[1]
        and module.kernel_size[0] % 2 == 1
        and module.kernel_size[0] > 1
        and module.padding_mode == "zeros"
    )
