"""The package's shape: layers that import only downward, one definition per concept, short modules.

The layer contract itself is pyproject.toml's `[tool.importlinter]`; `.ci/run` runs `lint-imports`
on it, and these tests run it too, so that a change that breaks it fails the suite where it is
made. docs/ARCHITECTURE.md, "The package, layer by layer", says what each layer owns.
"""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grok1"
MAX_MODULE_LINES = 600
LONGER_ALLOWED = {"model.py"}  # the architecture, top to bottom, reads as one file


def modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports is not installed: python3 -m pip install -r requirements.txt")
    return subprocess.run([command, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(pathlib.Path(sys.executable).parent) + ":/usr/bin:/bin",
                               "PYTHONPATH": str(cwd)})


def test_the_import_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "grok1", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    mesh = copy / "grok1" / "mesh.py"
    # A function-local import counts as much as one at the top of the file.
    mesh.write_text(mesh.read_text() + "\n\ndef _upward():\n    from grok1.model import KVCache\n"
                                       "    return KVCache\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "grok1.mesh is not allowed to import grok1.model" in result.stdout


def test_no_module_but_the_model_is_longer_than_600_lines():
    long = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules()
            if path.name not in LONGER_ALLOWED and len(path.read_text().splitlines()) > MAX_MODULE_LINES}
    assert not long


def defined_names(path: pathlib.Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("name, home", [
    ("PARAM_AXES", "params.py"),             # each parameter's logical axes
    ("RELEASE_SCALE_BLOCKS", "params.py"),   # the release's int8 scale blocks
    ("is_quantized_linear", "params.py"),    # "is this weight int8 in the release"
    ("official_layer", "params.py"),         # the layer-path grammar
    ("LOGICAL_TO_MESH", "mesh.py"),          # the mesh rules
    ("partition_spec", "mesh.py"),
])
def test_each_concept_is_defined_in_one_module(name, home):
    homes = [str(path.relative_to(PACKAGE)) for path in modules() if name in defined_names(path)]
    assert homes == [home]


def test_only_the_schema_parses_layer_paths():
    """The official per-layer module names are matched by one regex, in grok1/params.py."""
    pattern = re.compile(r"decoder_layer_\(|decoder_layer_\\d|decoder_layer_\(\\d")
    parsers = [str(path.relative_to(PACKAGE)) for path in modules() if pattern.search(path.read_text())]
    assert parsers == ["params.py"]
