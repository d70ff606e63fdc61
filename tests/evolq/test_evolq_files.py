"""files.py: atomic writes with ordinary permissions, and clear errors on broken files."""

import json
import os
import stat

import pytest
import torch

from evolq.errors import RunError
from evolq.files import atomic_path, load_tensors, read_json, save_tensors, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_write_json_is_atomic_and_respects_the_umask(tmp_path, umask_022):
    path = tmp_path / "result.json"
    data = {"b": [1, 2.5], "a": {"nested": "x"}, "path": tmp_path}
    write_json(path, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temp file left
    text = path.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted keys
    assert json.loads(text) == {"a": {"nested": "x"}, "b": [1, 2.5], "path": str(tmp_path)}
    assert read_json(path) == json.loads(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_write_json_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_write_json_replaces_an_existing_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    write_json(path, {"v": 2})
    assert read_json(path) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(ZeroDivisionError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_text('{"v": 2, "half')
            1 / 0
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_creates_folders_and_reports_unwritable_ones(tmp_path):
    write_json(tmp_path / "new" / "deeper" / "r.json", [1])
    assert read_json(tmp_path / "new" / "deeper" / "r.json") == [1]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="cannot write to folder"):
        write_json(tmp_path / "file" / "r.json", [1])


def test_read_json_truncated_or_missing_is_a_run_error(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"numbers": list(range(20))})
    path.write_text(path.read_text()[:30])
    with pytest.raises(RunError, match="is not valid JSON .*it may be truncated") as error:
        read_json(path)
    assert str(path) in str(error.value)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunError, match="not valid JSON"):
        read_json(path)
    with pytest.raises(RunError, match="does not exist"):
        read_json(tmp_path / "missing.json")


def test_tensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "scales.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32), "t": torch.randn(4, 3).T}
    save_tensors(path, tensors, metadata={"preset": "w4a8"})
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert loaded["b"].dtype == torch.int32
    assert [p.name for p in tmp_path.iterdir()] == ["scales.safetensors"]


def test_save_tensors_respects_the_umask(tmp_path, umask_022):
    path = tmp_path / "scales.safetensors"
    save_tensors(path, {"a": torch.zeros(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
