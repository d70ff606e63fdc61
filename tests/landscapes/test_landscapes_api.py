import subprocess
import sys

import landscapes


def test_public_api_is_named():
    assert landscapes.__all__ == ["direction", "slice_1d", "slice_2d", "roughness", "plot_landscape", "save_figure"]
    assert all(callable(getattr(landscapes, name)) for name in landscapes.__all__)


def test_importing_landscapes_pulls_in_neither_torch_nor_evolq():
    code = "import sys, landscapes; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'evolq')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
