"""Layers import in one direction: core (qgraph/) ← passes/ ← backends/ ← CLI/driver/examples."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LAYER = {"cli.py", "driver.py"}  # the CLI layer inside qgraph/, allowed to use everything


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _files(folder: str):
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize(
    "path", [p for p in _files("qgraph") if p.name not in TOP_LAYER], ids=lambda p: p.name
)
def test_core_does_not_import_passes_or_backends(path):
    bad = {m for m in _imports(path) if m.startswith(("qgraph.passes", "qgraph.backends"))}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("passes"), ids=lambda p: p.name)
def test_passes_do_not_import_backends(path):
    assert not {m for m in _imports(path) if m.startswith("qgraph.backends")}


def test_one_import_root(tmp_path):
    """The installed package maps passes/ and backends/ to qgraph.passes / qgraph.backends only.

    Run from an empty folder, so the repository root (which holds passes/ and backends/ folders)
    is not on sys.path.
    """
    code = (
        "import importlib.util as u, qgraph.passes, qgraph.backends.tensorrt, qgraph.backends.onnxruntime;"
        "import onnxruntime;"  # the backend folder named onnxruntime does not shadow the runtime
        "print(u.find_spec('passes'), u.find_spec('backends'), qgraph.passes.__name__,"
        " hasattr(onnxruntime, 'InferenceSession'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None", "qgraph.passes", "True"]
