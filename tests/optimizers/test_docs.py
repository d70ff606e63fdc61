"""The examples in docs/optimizers.md run as written."""

import re
from pathlib import Path


from optimizers import registry

DOC = Path(__file__).resolve().parents[2] / "docs" / "optimizers.md"


def test_every_python_block_runs(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the doc registers one
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert "ng:OnePlusOne" in capsys.readouterr().out
