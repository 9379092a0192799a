"""Every DeepLabv3+ configuration runs the DeepLabTester contract (model_contract.py).

The backbones are timm's tiny test models (and resnet10t), so each check takes well under a
second; the release's resnet101s network is checked once, in test_models.py.
"""

from __future__ import annotations

from model_contract import DeepLabTester

# A narrow decoder keeps the tiny backbones' checks fast; the release's widths (the
# defaults) are checked on test_resnet at stride 8 and on resnet10t.
NARROW = {"aspp_channels": 32, "low_level_channels": 16, "head_channels": 32}


class TestTinyResNetOS8(DeepLabTester):
    kwargs = {"backbone": "test_resnet"}


class TestTinyResNetOS16(DeepLabTester):
    kwargs = {"backbone": "test_resnet", "output_stride": 16, **NARROW}


class TestTinyResNetOS32(DeepLabTester):
    kwargs = {"backbone": "test_resnet", "output_stride": 32, **NARROW}


class TestTinyResNetCustomDecoder(DeepLabTester):
    kwargs = {
        "backbone": "test_resnet",
        "aspp_channels": 32,
        "aspp_dilations": (2, 4),
        "low_level_channels": 16,
        "head_channels": 24,
        "dropout": 0.0,
        "multi_grid": False,
    }


class TestTinyEfficientNetOS16(DeepLabTester):
    kwargs = {"backbone": "test_efficientnet", "output_stride": 16, **NARROW}


class TestTinyConvNeXtOS8(DeepLabTester):
    kwargs = {"backbone": "test_convnext", **NARROW}


class TestTinyByobNetOS16(DeepLabTester):
    kwargs = {"backbone": "test_byobnet", "output_stride": 16, **NARROW}


class TestTinyNFNetOS8(DeepLabTester):
    kwargs = {"backbone": "test_nfnet", **NARROW}


class TestResNet10tOS8(DeepLabTester):
    kwargs = {"backbone": "resnet10t"}
