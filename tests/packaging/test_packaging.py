"""Packaging: ranges in pyproject, exact versions in constraints.txt, one version, a license.

Installing evolq must not replace a user's torch, so pyproject.toml declares ranges; `make`
and CI install the exact versions of constraints.txt (docs/install.md). The last test builds
the wheel from a copy of the sources and looks inside it.
"""

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # pytest itself depends on packaging
from packaging.version import Version

import evolq

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def declared() -> list[Requirement]:
    extras = PROJECT.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in PROJECT["dependencies"] + [r for group in extras for r in group]]


def constraints() -> dict[str, Requirement]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {r.name.lower(): r for r in reqs}


def test_pyproject_declares_ranges_not_exact_versions():
    for req in declared():
        assert all(spec.operator not in ("==", "===") for spec in req.specifier), (
            f"{req} in pyproject.toml is an exact pin: put a range there and the version in constraints.txt")
        assert req.specifier, f"{req} has no lower bound"


def test_constraints_pin_every_direct_dependency_inside_its_range():
    pins = constraints()
    for req in declared():
        pin = pins.get(req.name.lower())
        assert pin is not None, f"{req.name} is not pinned in constraints.txt"
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{pin} in constraints.txt is not an exact version"
        assert req.specifier.contains(spec.version), f"constraints.txt pins {pin}, outside pyproject's {req}"
    assert set(pins) == {r.name.lower() for r in declared()}, "constraints.txt pins a package pyproject does not name"


def test_make_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", makefile)


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "evolq.__version__"}
    # setuptools reads a plain string literal without importing evolq (and so torch)
    tree = ast.parse((ROOT / "evolq" / "__init__.py").read_text())
    assigned = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)]
    assert len(assigned) == 1 and isinstance(assigned[0], ast.Constant)
    assert assigned[0].value == evolq.__version__
    Version(evolq.__version__)  # a valid version string


def test_license_file_matches_the_declared_license():
    assert PROJECT["license"] == "Apache-2.0"
    assert "LICENSE" in PROJECT["license-files"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_contents(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    required = Version(re.search(r"setuptools>=([\d.]+)", " ".join(PYPROJECT["build-system"]["requires"]))[1])
    if Version(setuptools.__version__) < required:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs >= {required}")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("evolq", "optimizers", "landscapes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"evolq-{evolq.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"evolq-{evolq.__version__}.dist-info"
    for name in ("evolq/__init__.py", "optimizers/__init__.py", "landscapes/__init__.py",
                 "evolq/zoo/fmnist_vit.safetensors", "evolq/zoo/fmnist_vit.json",
                 "evolq/quant/kernels.c", f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"):
        assert name in names, f"{name} is missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert not re.search(r"^Requires-Dist: torch(vision)?\s*==", metadata, flags=re.M)
