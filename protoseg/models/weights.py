"""Backbone weights: where ``pretrained`` points, and loading them into a timm trunk.

``pretrained`` is "" (random init), "imagenet" (the backbone's default timm hub tag), a
timm tag such as "resnet101s.gluon_in1k", or a local weights file. Hub tags are fetched and
loaded by timm; local files are read here without running pickled code and loaded with
``load_state_dict(strict=False)``, whose missing and unexpected keys decide what is reported.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import Tensor, nn

from protoseg.models.errors import ModelError

__all__ = [
    "WEIGHT_SUFFIXES",
    "LoadReport",
    "WeightSource",
    "create_with_weights",
    "load_state",
    "read_state_dict",
    "resolve_weights",
]

# A ``pretrained`` value with one of these endings is meant as a file, even if it is absent.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".npz")
# Training checkpoints nest the weights under one of these keys (tried in this order).
_WRAPPER_KEYS = ("state_dict", "model")
# DistributedDataParallel / DataParallel prefix every key of the wrapped module with this.
_PARALLEL_PREFIX = "module."
# BatchNorm recreates its step counter itself; a file without it lacks no weight.
_COUNTER_SUFFIX = "num_batches_tracked"
_HUB_PROBE_TIMEOUT_S = 5.0
# Warnings name at most this many keys; longer lists end with a count.
_MAX_LISTED_KEYS = 20


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's initial weights come from: nowhere, a timm hub tag, or a file."""

    # The timm name to create, carrying the pretrained tag when the weights come from the hub.
    model_name: str
    file: Path | None = None
    hub: bool = False


@dataclass(frozen=True)
class LoadReport:
    """The outcome of :func:`load_state`, in the module's key names."""

    loaded: tuple[str, ...]
    # Module tensors the file lacks; they keep their initialisation.
    missing: tuple[str, ...]
    # File tensors under a module the trunk has but matching none of its tensors.
    unexpected: tuple[str, ...]
    # File tensors of modules features_only trunks drop (classifier, head): expected.
    ignored: tuple[str, ...]


def resolve_weights(backbone: str, pretrained: str) -> WeightSource:
    """Map a ``pretrained`` value to the timm name to create and the weights to load.

    Raises :class:`ModelError` for a directory, a missing file, a tag of another
    architecture, or a tag timm does not know.
    """
    spec = pretrained.strip()
    if not spec:
        return WeightSource(backbone)
    if spec.lower() == "imagenet":
        # timm picks the name's default pretrained tag itself.
        return WeightSource(backbone, hub=True)
    path = Path(spec).expanduser()
    if path.is_file():
        return WeightSource(backbone, file=path)
    if path.exists():
        raise ModelError(f"model.pretrained={spec!r} is a directory, not a weights file")
    if "/" in spec or os.sep in spec or spec.startswith("~") or spec.endswith(WEIGHT_SUFFIXES):
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
    return WeightSource(name, hub=True)


def create_with_weights(
    source: WeightSource, *, convert_checkpoint: bool = False, **timm_kwargs: Any
) -> nn.Module:
    """Create ``timm.create_model(source.model_name, **timm_kwargs)`` with its initial weights.

    Hub weights are downloaded (or read from the cache) by timm; without network access
    this fails at once with a :class:`ModelError` naming the file to fetch by hand. A local
    file is loaded afterwards by :func:`load_state`; with ``convert_checkpoint`` it first
    goes through the ``checkpoint_filter_fn`` of the model's timm module, the function timm
    runs on hub files, which turns an author's original file (e.g. Meta's DINOv2/DINOv3
    ``.pth``) into timm's names and shapes.
    """
    if source.hub:
        _fail_fast_if_hub_unreachable(source.model_name)
    try:
        model = timm.create_model(source.model_name, pretrained=source.hub, **timm_kwargs)
    except OSError as e:
        if source.hub:
            raise _download_error(source.model_name, e) from e
        raise ModelError(f"timm could not build {source.model_name!r}: {e}") from e
    except (RuntimeError, TypeError, ValueError, AssertionError, IndexError, KeyError) as e:
        args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items())
        why = f"{type(e).__name__}: {e}"
        raise ModelError(
            f"timm could not build backbone {source.model_name!r} ({args}): {why}"
        ) from e
    if source.file is not None:
        arch = split_model_name_tag(source.model_name)[0]
        state = read_state_dict(source.file)
        if convert_checkpoint:
            state = _timm_checkpoint_filter(model, state, str(source.file))
        load_state(model, state, source=str(source.file), arch=arch)
    return model


def _timm_checkpoint_filter(
    model: nn.Module, state: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    """Run the ``checkpoint_filter_fn`` of the timm module that defines ``model``'s class."""
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if not callable(convert):
        return state
    try:
        converted = convert(state, model)
    except (RuntimeError, ValueError, KeyError, IndexError, AssertionError) as e:
        raise ModelError(
            f"{source!r}: timm's checkpoint conversion for {type(model).__name__} failed "
            f"({type(e).__name__}: {e}); is it a checkpoint of this architecture?"
        ) from e
    return {k: v for k, v in converted.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the tensors of a weights file (.safetensors, or a torch file such as .pth/.bin).

    Torch files are read with ``weights_only=True``, so a file that needs arbitrary code to
    unpickle is refused rather than run. Checkpoints that nest the weights under
    ``state_dict`` or ``model`` are unwrapped and a ``module.`` prefix is removed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raise ModelError(
            f"{str(path)!r}: .npz (JAX) weights are not supported; convert them to a timm "
            "state_dict saved as .pth or .safetensors"
        )
    try:
        if suffix == ".safetensors":
            obj: object = load_safetensors(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"could not read pretrained weights {str(path)!r} as tensors only "
            f"(torch.load with weights_only=True: {_unpickling_reason(e)}); save the "
            "state_dict alone, e.g. torch.save(model.state_dict(), path)"
        ) from e
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as e:
        raise ModelError(f"could not read pretrained weights {str(path)!r}: {e}") from e
    state = _unwrap_state_dict(obj, str(path))
    from protoseg.files import non_finite_tensors

    bad = non_finite_tensors(state)
    if bad:
        # Starting from NaN weights trains nothing and reports an all-one-class mask.
        raise ModelError(
            f"pretrained weights {str(path)!r} hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); the file is damaged or from a diverged run"
        )
    return state


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """The specific cause inside torch's long weights_only error text."""
    text = str(err)
    # torch wraps the cause in paragraphs of advice to load with weights_only=False, which
    # would run the file's code: show only the cause.
    _, marker, cause = text.partition("WeightsUnpickler error:")
    line = (cause if marker else text).strip().splitlines()
    return line[0].split(". ")[0] if line else type(err).__name__


def _unwrap_state_dict(obj: object, source: str) -> dict[str, Tensor]:
    """Find the tensor mapping inside a checkpoint and drop any DataParallel prefix."""
    # Nesting can repeat, e.g. {"model": {"state_dict": ...}} from some trainers.
    while isinstance(obj, Mapping):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelError(f"{source!r} holds a {type(obj).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:5]))
        raise ModelError(f"{source!r} holds no tensors (top-level keys: {keys or 'none'})")
    return {k.removeprefix(_PARALLEL_PREFIX): v for k, v in tensors.items()}


def load_state(
    module: nn.Module, state: Mapping[str, Tensor], *, source: str, arch: str
) -> LoadReport:
    """Load ``state`` into a timm (features_only) trunk with ``load_state_dict(strict=False)``.

    Keys of modules the trunk drops (the classifier, a final head) are ignored silently;
    other missing or unexpected keys are warned about by name. Raises :class:`ModelError`
    when no tensor matches (the file is of another architecture or naming) or when shapes
    differ (another variant of the architecture).
    """
    own = module.state_dict()
    weights = [k for k in own if not k.endswith(_COUNTER_SUFFIX)]
    mapped = {_trunk_key(k, own): v for k, v in state.items()}
    if not any(k in mapped for k in weights):
        raise ModelError(
            f"{source!r} does not hold {arch!r} weights: it has none of the trunk's "
            f"{len(weights)} tensors (trunk keys: {', '.join(weights[:3])}, ...; file keys: "
            f"{', '.join(list(state)[:3])}, ...); save a timm {arch!r} state_dict with the "
            "trunk's key names"
        )
    mismatched = [k for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        shapes = ", ".join(
            f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        raise ModelError(
            f"{source!r} does not fit backbone {arch!r}: {len(mismatched)} tensors have "
            f"other shapes (file vs model: {shapes}); is it another variant of {arch!r}?"
        )

    result = module.load_state_dict(mapped, strict=False)
    # A classifier the trunk replaced by a parameterless module (timm's head at
    # num_classes=0 is nn.Identity) is dropped as much as one it does not have.
    children = {name for name, child in module.named_children() if child.state_dict()}
    missing = tuple(k for k in result.missing_keys if not k.endswith(_COUNTER_SUFFIX))
    unexpected = tuple(k for k in result.unexpected_keys if k.split(".")[0] in children)
    ignored = tuple(k for k in result.unexpected_keys if k.split(".")[0] not in children)
    if missing:
        warnings.warn(
            f"{source}: {len(missing)} of the {arch!r} backbone's {len(weights)} tensors are "
            f"not in the file and keep their random initialisation: {_listing(missing)}",
            stacklevel=2,
        )
    if unexpected:
        warnings.warn(
            f"{source}: {len(unexpected)} tensors match none of the {arch!r} backbone's and "
            f"were not loaded: {_listing(unexpected)}",
            stacklevel=2,
        )
    loaded = tuple(k for k in mapped if k in own)
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected, ignored=ignored)


def _trunk_key(key: str, own: Mapping[str, Tensor]) -> str:
    """Name a key of the full timm model as the features_only trunk names it."""
    if key in own:
        return key
    # timm's FeatureListNet flattens top-level Sequentials, so ``stages.0.x`` becomes
    # ``stages_0.x`` in ConvNeXt-style trunks while checkpoints keep the dotted name.
    flat = key.replace(".", "_", 1)
    return flat if flat in own else key


def _listing(keys: tuple[str, ...]) -> str:
    """Comma-separated keys, cut after ``_MAX_LISTED_KEYS`` with a count of the rest."""
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    rest = len(keys) - _MAX_LISTED_KEYS
    return f"{shown} and {rest} more" if rest > 0 else shown


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
        if pcfg.url:
            # DINOv2's cfgs also keep Meta's original file, which timm converts on load.
            source += f", or the original file {pcfg.url}"
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
