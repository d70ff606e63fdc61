"""Safe files: nothing in the source unpickles (no pickle, no ``torch.load`` without
``weights_only=True``); every write is a temporary file renamed into place.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from evolq.errors import RunError
from evolq.files import atomic_path, save_tensors, write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("evolq", "optimizers", "landscapes", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
UNSAFE_CALLS = {"read_pickle", "load_pickle", "loads_pickle", "unpickle"}


def _sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert any(path.parent.name == "evolq" for path in files)
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loading(source: str) -> list[tuple[int, str]]:
    """Lines that import a pickling module, unpickle, or call torch.load without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNSAFE_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append((node.lineno, "from torch import load (use torch.load(..., weights_only=True))"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.split(".")[-1] in UNSAFE_CALLS:
                found.append((node.lineno, name))
            elif name in ("torch.load", "torch.serialization.load") and not _keyword_is_true(node, "weights_only"):
                found.append((node.lineno, f"{name} without weights_only=True"))
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if _keyword_is_true(node, "allow_pickle"):
                    found.append((node.lineno, f"{name}(allow_pickle=True)"))
            elif name.endswith("add_safe_globals") or name.endswith("safe_globals"):
                found.append((node.lineno, f"{name} widens what weights_only loads"))
    return found


def test_the_scanner_finds_unsafe_loading():
    bad = ("import pickle\nfrom torch import load\nimport torch, numpy as np, pandas as pd\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\npd.read_pickle(p)\n")
    assert [line for line, _ in unsafe_loading(bad)] == [1, 2, 4, 5, 6, 7]
    assert unsafe_loading("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n") == []


def test_source_tree_never_unpickles():
    found = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in _sources()
             for line, what in unsafe_loading(path.read_text())]
    assert found == []


# -- atomic writes ---------------------------------------------------------------------------
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "half')
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert os.listdir(tmp_path) == ["result.json"]


def test_writes_go_through_a_temporary_file_beside_the_target(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(source, destination):
        replaced.append((Path(source), Path(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", spy)
    write_text(tmp_path / "history.csv", "a,b\n1,2\n")
    save_tensors(tmp_path / "scales.safetensors", {"x": torch.ones(3)})
    destinations = [destination for _, destination in replaced]
    assert tmp_path / "history.csv" in destinations and tmp_path / "scales.safetensors" in destinations
    for source, destination in replaced:
        assert source.parent == destination.parent  # same file system: the rename is atomic
    assert sorted(os.listdir(tmp_path)) == ["history.csv", "scales.safetensors"]


def test_writing_under_a_regular_file_is_a_run_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="cannot write to folder .*file/run"):
        write_json(tmp_path / "file" / "run" / "result.json", {})
