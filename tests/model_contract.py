"""The contract every registered segmentation network keeps, as test base classes.

A configuration joins in one line::

    class TestMyNet(DeepLabTester):
        kwargs = {"backbone": "test_resnet", "output_stride": 16}

and inherits every check below: ``ModelTester`` holds what every network keeps (the
outputs methods and the prototype branch read, ``classify``, parameter groups, config
building); ``DeepLabTester`` adds DeepLabv3+'s auxiliary head and output strides.
Configurations should use timm's tiny test models so that each check runs in a fraction
of a second.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import ModelConfig
from protoseg.models import MODELS, create_model


class ModelTester:
    """Checks for one registered network built as ``MODELS[model_name](num_classes, **kwargs)``."""

    model_name: ClassVar[str] = "deeplabv3plus"
    kwargs: ClassVar[dict[str, Any]] = {}
    num_classes: ClassVar[int] = 3
    # Divisible by 32, so every feature level's size is exact; not square, to catch swaps.
    size: ClassVar[tuple[int, int]] = (32, 64)
    # Not divisible by 4: stems that pad round up, patchify stems round down.
    odd_size: ClassVar[tuple[int, int]] = (33, 47)
    # BatchNorm in train mode needs more than one value per channel after image pooling.
    batch: ClassVar[int] = 2
    # Settings that switch on every optional head, for the backward check.
    all_heads: ClassVar[dict[str, Any]] = {}
    # Parameters at the end of the head group that belong to output layers (weight, bias).
    output_parameters: ClassVar[int] = 2

    def build(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """Build the configuration (plus ``overrides``) from a fixed seed."""
        torch.manual_seed(seed)
        return MODELS[self.model_name](self.num_classes, **{**self.kwargs, **overrides})

    def inputs(self, size: tuple[int, int] | None = None, seed: int = 0) -> Tensor:
        """A reproducible batch of images of ``size`` (default ``self.size``)."""
        height, width = size or self.size
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, 3, height, width, generator=generator)

    def feature_size(self, model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
        """The spatial size of ``features`` for an input of ``size``."""
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def model(self) -> nn.Module:
        """The configuration in eval mode, shared by the checks that do not change it."""
        return self.build().eval()

    def test_create_model_from_config_builds_the_same_network(self, model: nn.Module) -> None:
        cfg = ModelConfig(name=self.model_name, **self.kwargs)
        torch.manual_seed(0)
        built = create_model(cfg, self.num_classes)
        assert type(built) is type(model)
        ours, theirs = model.state_dict(), built.state_dict()
        assert list(ours) == list(theirs)
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key
        # Equal weights can still differ in strides and dilations: compare outputs too.
        with torch.no_grad():
            assert torch.equal(
                built.eval()(self.inputs())["logits"], model(self.inputs())["logits"]
            )

    def test_forward_shapes(self, model: nn.Module) -> None:
        height, width = self.size
        with torch.no_grad():
            out = model(self.inputs())
        assert set(out) == {"logits", "features"}
        assert out["logits"].shape == (self.batch, self.num_classes, height, width)
        expected = (self.batch, model.feature_dim, *self.feature_size(model, self.size))
        assert out["features"].shape == expected

    def test_odd_input_size_in_train_mode_gives_logits_at_that_size(self) -> None:
        model = self.build().train()
        with torch.no_grad():
            out = model(self.inputs(self.odd_size))
        assert out["logits"].shape == (self.batch, self.num_classes, *self.odd_size)
        assert out["features"].shape[:2] == (self.batch, model.feature_dim)

    def test_param_groups_partition_parameters(self, model: nn.Module) -> None:
        backbone, head = model.param_groups()
        assert backbone and head
        ids = [id(p) for p in backbone + head]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters()}
        assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}

    def test_eval_is_deterministic(self, model: nn.Module) -> None:
        with torch.no_grad():
            first, second = model(self.inputs()), model(self.inputs())
        for key in first:
            assert torch.equal(first[key], second[key]), key

    def test_classify_reproduces_logits(self, model: nn.Module) -> None:
        with torch.no_grad():
            out = model(self.inputs())
            head = model.classify(out["features"])
        assert head.shape == (self.batch, self.num_classes, *out["features"].shape[-2:])
        up = F.interpolate(head, size=self.size, mode="bilinear", align_corners=True)
        torch.testing.assert_close(up, out["logits"])

    def test_backward_reaches_backbone_and_heads(self) -> None:
        model = self.build(**self.all_heads).train()
        out = model(self.inputs())
        loss = sum(v.square().mean() for k, v in out.items() if k != "features")
        assert isinstance(loss, Tensor)
        loss.backward()
        no_grad = [name for name, p in model.named_parameters() if p.grad is None]
        assert not no_grad
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        # The stem is furthest from the loss: a gradient there went through every level.
        stem = next(model.backbone.parameters())
        assert stem.grad.abs().sum() > 0
        # The last parameters of the head group are the classifiers' output layers.
        _, head = model.param_groups()
        assert all(p.grad.abs().sum() > 0 for p in head[-self.output_parameters :])

    def test_state_dict_round_trip(self, model: nn.Module) -> None:
        other = self.build(seed=1).eval()
        x = self.inputs()
        with torch.no_grad():
            assert not torch.equal(other(x)["logits"], model(x)["logits"])
            other.load_state_dict(model.state_dict())
            assert torch.equal(other(x)["logits"], model(x)["logits"])
        assert list(other.state_dict()) == list(model.state_dict())


class DeepLabTester(ModelTester):
    """ModelTester plus DeepLabv3+'s auxiliary head and output-stride checks."""

    all_heads: ClassVar[dict[str, Any]] = {"aux_head": True}
    # The main classifier's and the aux head's output convs.
    output_parameters: ClassVar[int] = 4

    @property
    def output_stride(self) -> int:
        """The configuration's output stride (the network's default when not given)."""
        default = inspect.signature(MODELS[self.model_name]).parameters["output_stride"].default
        return int(self.kwargs.get("output_stride", default))

    def feature_size(self, model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
        """DeepLabv3+'s features are the stride-4 low-level map."""
        return size[0] // 4, size[1] // 4

    @pytest.fixture(scope="class")
    def aux_model(self) -> nn.Module:
        """The configuration with the auxiliary head; checks set the mode they need."""
        return self.build(aux_head=True)

    def test_odd_input_size_in_train_mode(self, aux_model: nn.Module) -> None:
        model = aux_model.train()
        x = self.inputs(self.odd_size)
        with torch.no_grad():
            out = model(x)
            low = model.backbone(x)[0]
        assert out["logits"].shape == (self.batch, self.num_classes, *self.odd_size)
        assert out["aux"].shape == out["logits"].shape
        assert out["features"].shape == (self.batch, model.feature_dim, *low.shape[-2:])
        for got, side in zip(low.shape[-2:], self.odd_size):
            assert abs(got - side / 4) < 1

    def test_aux_only_when_asked(self, aux_model: nn.Module) -> None:
        for mode in (True, False):
            with torch.no_grad():
                out = aux_model.train(mode)(self.inputs())
            assert out["aux"].shape == (self.batch, self.num_classes, *self.size)
            assert out["logits"].shape == out["aux"].shape

    def test_param_groups_include_the_aux_head(self, aux_model: nn.Module) -> None:
        backbone, head = aux_model.param_groups()
        assert {id(p) for p in backbone + head} == {id(p) for p in aux_model.parameters()}
        assert {id(p) for p in aux_model.aux.parameters()} <= {id(p) for p in head}

    def test_output_stride(self, model: nn.Module) -> None:
        stride = self.output_stride
        assert model.backbone.reductions == (4, min(16, stride), stride)
        height, width = self.size
        with torch.no_grad():
            levels = model.backbone(self.inputs())
        for level, reduction in zip(levels, model.backbone.reductions):
            assert level.shape[-2:] == (height // reduction, width // reduction)
