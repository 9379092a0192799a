"""Every number of a config has a range checked at load; YAML is read strictly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protoseg.cli import main
from protoseg.config import Config, ConfigError, load_config, shipped_config_dir
from protoseg.config.ranges import numeric_fields, range_of
from protoseg.methods.registry import METHOD_CONFIGS


def test_every_numeric_field_of_every_method_has_a_range() -> None:
    import protoseg.methods  # noqa: F401 - registers the methods

    missing = set()
    for name, cls in METHOD_CONFIGS.items():
        for key in numeric_fields(Config(method=cls())):
            if range_of(key) is None:
                missing.add(f"{key} ({name})")
    assert not missing, f"add a range to protoseg/config/ranges.py for: {sorted(missing)}"


@pytest.mark.slow
def test_every_shipped_recipe_is_inside_the_ranges() -> None:
    recipes = sorted(shipped_config_dir().rglob("*.yaml"))
    assert len(recipes) > 20
    for recipe in recipes:
        if recipe.name == "base.yaml" or "base" in recipe.stem.split("_"):
            continue
        load_config(recipe, ["data.root=x"])  # raises if a default is out of range


@pytest.mark.parametrize(
    ("recipe", "override", "key"),
    [
        ("synthetic/supervised.yaml", "optim.lr=nan", "optim.lr"),
        ("synthetic/supervised.yaml", "optim.lr=inf", "optim.lr"),
        ("synthetic/supervised.yaml", "optim.lr=-0.01", "optim.lr"),
        ("synthetic/supervised.yaml", "optim.poly_power=-1", "optim.poly_power"),
        ("synthetic/supervised.yaml", "optim.poly_power=0", "optim.poly_power"),
        ("synthetic/supervised.yaml", "optim.decoder_lr_mult=-10", "optim.decoder_lr_mult"),
        ("synthetic/supervised.yaml", "optim.momentum=1", "optim.momentum"),
        ("synthetic/supervised.yaml", "optim.weight_decay=-1e-4", "optim.weight_decay"),
        ("synthetic/supervised.yaml", "train.ohem_threshold=1.5", "train.ohem_threshold"),
        ("synthetic/supervised.yaml", "train.aux_weight=-0.4", "train.aux_weight"),
        ("synthetic/supervised.yaml", "train.epochs=nan", "train.epochs"),
        ("synthetic/supervised.yaml", "model.dropout=1.0", "model.dropout"),
        ("synthetic/supervised.yaml", "data.std=[0.2,0,0.2]", r"data.std\[1\]"),
        ("synthetic/supervised.yaml", "eval.scales=[1.0,-0.5]", r"eval.scales\[1\]"),
        ("synthetic/supervised.yaml", "data.ignore_index=300", "data.ignore_index"),
        ("synthetic/supervised.yaml", "train.checkpoint_every=-1", "train.checkpoint_every"),
        ("synthetic/pcr.yaml", "method.unsup_weight=-1", "method.unsup_weight"),
        ("synthetic/pcr.yaml", "method.prototypes.loss_weight=-1", "method.prototypes.loss_weight"),
        ("synthetic/pcr.yaml", "method.confidence_threshold=1.2", "method.confidence_threshold"),
        ("synthetic/pcr.yaml", "method.prototypes.temperature=0", "method.prototypes.temperature"),
        ("synthetic/pcr.yaml", "method.ema_decay=nan", "method.ema_decay"),
        ("synthetic/u2pl.yaml", "method.drop_percent=120", "method.drop_percent"),
        ("synthetic/u2pl.yaml", "method.contrast.low_rank=30", "method.contrast.low_rank"),
        ("synthetic/cps.yaml", "method.cps_weight=-1.5", "method.cps_weight"),
    ],
)
def test_numbers_outside_their_range_are_refused_naming_key_and_range(
    recipe: str, override: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(recipe, ["data.root=x", override])
    assert "must" in str(err.value)


def test_a_range_error_is_one_line_from_the_command(capsys) -> None:
    assert main(["train", "synthetic/supervised.yaml", "data.root=x", "optim.lr=nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr=nan must be a finite number > 0" in err


# ---- YAML ------------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_a_section_given_twice_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  iterations: 5\ndata:\n  root: x\n\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml, line 6: the key 'train' is repeated"):
        load_config(path)


def test_a_key_given_twice_inside_a_section_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "optim:\n  lr: 0.01\n  momentum: 0.9\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"line 4: the key 'lr' is repeated \(first at line 2\)"):
        load_config(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    # "<<: *common" then an explicit key is YAML's way to override, not a duplicate.
    path = _write(
        tmp_path,
        "common: &common {lr: 0.01, momentum: 0.8}\n",
    )
    from protoseg.config.yaml_io import load_yaml

    data = load_yaml(path.read_text() + "optim:\n  <<: *common\n  lr: 0.05\n", path)
    assert data["optim"] == {"lr": 0.05, "momentum": 0.8}


def _laughs(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_file_is_refused_quickly(tmp_path: Path) -> None:
    path = _write(tmp_path, _laughs(10))  # 9**10 = 3.5 billion strings once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(path)
    assert time.perf_counter() - started < 2.0


def test_too_many_aliases_are_refused(tmp_path: Path) -> None:
    text = "x: &x 1\nitems: [" + ", ".join(["*x"] * 1500) + "]\n"
    with pytest.raises(ConfigError, match="more than 1000 aliases"):
        load_config(_write(tmp_path, text))


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    base = shipped_config_dir() / "synthetic" / "supervised.yaml"
    path = _write(
        tmp_path, f"base: {base}\ndata:\n  root: x\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n"
    )
    assert load_config(path).data.std == [0.5, 0.5, 0.5]
