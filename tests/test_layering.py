"""The import layering of docs/architecture.md: no module imports an upper layer, config
imports no other layer, and only methods/ and components/ name a method or a component.

The AST scan reads every module's imports (also those inside functions); the subprocess
check imports the layers bottom-up and finds no module of an upper layer loaded early.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "protoseg"

# Layer of each top-level part of protoseg, bottom first. A module may import its own part
# and the parts of lower layers only; two parts of one layer never import each other.
LAYERS: dict[str, int] = {
    "protoseg": 0,  # the package itself: __version__ and lazy entry points only
    "config": 0,
    "lifecycle": 0,
    "signals": 0,
    "outputs": 0,
    "progress": 0,
    "distributed": 0,
    "files": 1,
    "data": 2,
    "models": 2,
    "components": 3,
    "inference": 4,
    "methods": 4,
    "engine": 5,
    "convert": 5,
    "analysis": 5,
    "cli": 6,
    "__main__": 7,  # python -m protoseg: the CLI
}
# What a module outside methods/ and components/ may import of those two parts: their
# packages, the method protocol and the method registry, never a method or component module.
PUBLIC_OF_METHODS = {"protoseg.methods", "protoseg.methods.protocol", "protoseg.methods.registry"}
PUBLIC_OF_COMPONENTS = {"protoseg.components"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def _imports(path: Path) -> list[str]:
    """Every protoseg module ``path`` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
            # "from protoseg import methods" imports a part too.
            if node.module == "protoseg":
                found += [f"protoseg.{a.name}" for a in node.names if f"{a.name}" in LAYERS]
    return [name for name in found if name == "protoseg" or name.startswith("protoseg.")]


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_has_a_layer():
    missing = sorted({_part(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS (and to docs/architecture.md)"


def test_no_module_imports_an_upper_layer_or_a_sibling_part():
    wrong = []
    for module, path in MODULES.items():
        own = _part(module)
        for target in _imports(path):
            other = _part(target)
            if other == own or target == "protoseg":
                continue
            if LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_config_imports_no_other_part_of_protoseg():
    config_modules = [m for m in MODULES if _part(m) == "config"]
    assert len(config_modules) > 1  # the package and its modules (ranges, YAML reading)
    for module in config_modules:
        outside = [t for t in _imports(MODULES[module]) if _part(t) != "config"]
        assert outside == [], f"{module} imports {outside}"


def test_only_methods_and_components_name_a_method_or_a_component():
    wrong = []
    for module, path in MODULES.items():
        if _part(module) in ("methods", "components"):
            continue
        for target in _imports(path):
            if target.startswith("protoseg.methods") and target not in PUBLIC_OF_METHODS:
                wrong.append(f"{module} imports {target}")
            if target.startswith("protoseg.components") and target not in PUBLIC_OF_COMPONENTS:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_a_wrong_import(tmp_path):
    """The AST scan itself: an import of an upper layer inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from protoseg.engine import trainer\n")
    assert _imports(bad) == ["protoseg.engine"]


_IMPORT_BOTTOM_UP = """
import importlib, json, sys
layers = json.loads(sys.argv[1])
skip = ("protoseg", "__main__")
order = sorted((rank, part) for part, rank in layers.items() if part not in skip)
report = []
for rank, part in order:
    importlib.import_module(f"protoseg.{part}")
    loaded = {m.split(".")[1] for m in sys.modules if m.startswith("protoseg.")}
    early = sorted(p for p in loaded if layers.get(p, 99) > rank)
    if early:
        report.append(f"importing protoseg.{part} loaded {early}")
print(json.dumps(report))
"""


@pytest.mark.slow  # several fresh interpreters import torch and timm: ~10-30 s on 2 cores
def test_each_layer_imports_without_the_layers_above():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # config first, alone: it must load no other protoseg module.
    alone = subprocess.run(
        [
            sys.executable,
            "-c",
            "import protoseg.config, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('protoseg')))",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    assert alone.stdout.split() == ["['protoseg',", "'protoseg.config']"]
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_BOTTOM_UP, json.dumps(LAYERS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if run.returncode:
        pytest.fail(run.stderr[-2000:])
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
