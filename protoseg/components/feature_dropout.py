"""UniMatch V2's complementary channel dropout, and the network interface it needs.

UniMatch V2 (its ``model/semseg/dpt.py`` lines 148-161) perturbs the strong pass between
encoder and decoder: the student's batch holds two strong views of B unlabelled images
(view 1 stacked on view 2); one Bernoulli(0.5) mask per image and channel, (B, C), scaled
by 2, multiplies view 1's encoder maps and its complement (2 - mask) view 2's, so the two
views of an image see disjoint channels. A random half of the B images (``floor(B / 2)``,
by ``randperm``) keeps every channel in both views. The same (B, C) mask multiplies every
map the encoder hands the decoder (four on DINOv2), broadcast over positions.

The dropout acts inside the network's forward, so the network must let its caller
transform the encoder's maps before the decoder (``FeatureTransformNetwork``); the
transform goes in through ``forward`` because DDP only synchronises the gradients of
what its wrapper's forward ran.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

# A function from the encoder's maps (each (B, C, h, w) or (B, N, C)) to the maps the
# decoder gets instead, in the same order and shapes.
FeatureTransform = Callable[[list[Tensor]], list[Tensor]]

# The keyword argument of ``forward`` that takes a FeatureTransform.
FEATURE_TRANSFORM_ARG = "feature_transform"


class FeatureTransformNetwork(Protocol):
    """A segmentation network whose caller may replace its encoder maps before the decoder.

    ``forward(images, feature_transform=fn)`` runs the encoder, gives its list of maps
    (``(B, C, h, w)`` or tokens ``(B, N, C)``, one per level the decoder reads) to ``fn``,
    decodes what ``fn`` returns, and returns the usual outputs (``logits`` at the input
    size, ``features``); without ``fn`` it is the plain forward.
    """

    def __call__(
        self, images: Tensor, *, feature_transform: FeatureTransform | None = None
    ) -> dict[str, Tensor]:
        """The network's outputs, decoded from the (transformed) encoder maps."""
        ...


def takes_feature_transform(network: nn.Module) -> bool:
    """Whether ``network.forward`` accepts the ``feature_transform`` keyword."""
    parameters = inspect.signature(network.forward).parameters
    return FEATURE_TRANSFORM_ARG in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def require_feature_transform(network: nn.Module, method: str) -> None:
    """ValueError naming the fix when ``network`` cannot take a feature transform."""
    if not takes_feature_transform(network):
        raise ValueError(
            f"method {method!r} drops channels between encoder and decoder, but "
            f"{type(network).__name__}.forward takes no {FEATURE_TRANSFORM_ARG}= argument: "
            f"choose a model.name whose network does (e.g. the DINOv2 + DPT network), or "
            f"set method.comp_drop=false"
        )


def complementary_channel_masks(
    images: int,
    channels: int,
    unmasked_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The masks of views 1 and 2: (images, channels) float32 on the CPU.

    View 1's entries are 0 or 2 (Bernoulli(0.5) times 2), view 2's are 2 minus view 1's;
    ``int(images * unmasked_fraction)`` images, chosen at random, get ones in both. Drawn
    on the CPU from ``generator`` (torch's global one by default, which checkpoints save),
    so a seed gives the same masks on every device.
    """
    if images < 0 or channels < 1:
        raise ValueError(f"need images >= 0 and channels >= 1, got {images} and {channels}")
    if not 0.0 <= unmasked_fraction <= 1.0:
        raise ValueError(f"unmasked_fraction={unmasked_fraction} must lie in [0, 1]")
    shape = (images, channels)
    # torch.binomial with one trial, as the release's Binomial(probs=0.5).sample: the same
    # seed gives the release's masks bit for bit (tools/unimatch_v2_dropout_parity.py).
    first = torch.binomial(torch.ones(shape), torch.full(shape, 0.5), generator=generator) * 2.0
    second = 2.0 - first
    unmasked = torch.randperm(images, generator=generator)[: int(images * unmasked_fraction)]
    first[unmasked] = 1.0
    second[unmasked] = 1.0
    return first, second


def _broadcast(mask: Tensor, like: Tensor) -> Tensor:
    """The (2B, C) mask shaped to multiply a (2B, C, h, w) map or (2B, N, C) tokens."""
    if like.dim() == 4:
        return mask[:, :, None, None]
    return mask[:, None, :]


def complementary_dropout(
    features: Sequence[Tensor],
    unmasked_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The encoder maps of two stacked views with complementary channels dropped.

    ``features``: the maps of a batch of 2B images, view 1 of B images on top of view 2 of
    the same images, each ``(2B, C, h, w)`` or ``(2B, N, C)`` with one C for all maps. One
    pair of masks (``complementary_channel_masks``) multiplies every map, so a channel an
    image drops at one level it drops at all. Returns new tensors in the input's order.
    """
    if not features:
        raise ValueError("complementary_dropout needs at least one feature map")
    first_map = features[0]
    rows = first_map.shape[0]
    channels = first_map.shape[1] if first_map.dim() == 4 else first_map.shape[-1]
    for i, f in enumerate(features):
        if f.dim() not in (3, 4):
            raise ValueError(
                f"feature map {i} has shape {tuple(f.shape)}: expected (B, C, h, w) or (B, N, C)"
            )
        c = f.shape[1] if f.dim() == 4 else f.shape[-1]
        if f.shape[0] != rows or c != channels:
            raise ValueError(
                f"feature map {i} has {f.shape[0]} rows and {c} channels, map 0 has {rows} "
                f"and {channels}: one mask needs the same batch and width on every map"
            )
    if rows % 2:
        raise ValueError(
            f"complementary_dropout needs two stacked views (an even batch), got {rows} rows"
        )
    view1, view2 = complementary_channel_masks(rows // 2, channels, unmasked_fraction, generator)
    masks = torch.cat([view1, view2]).to(first_map.device)
    return [f * _broadcast(masks.to(f.dtype), f) for f in features]
