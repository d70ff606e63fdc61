"""Run files: atomic writes (a result file is either the old one or the new one, never half of each),
JSON and tensors, with one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save

from evolq.errors import RunError, UsageError
from optimizers.files import TEMPORARY_NAME
from optimizers.files import atomic_path as _atomic_path

# What a killed write leaves: ours (``atomic_path``) and the safetensors writer's own.
_LEFT_BY_A_KILLED_WRITE = re.compile(f"{TEMPORARY_NAME.pattern}|\\.tmp[A-Za-z0-9_]{{6}}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`optimizers.files.atomic_path`: a temporary path beside ``path``, renamed onto it when the
    block succeeds; a folder that cannot be written is a :class:`RunError` naming it."""
    try:
        with _atomic_path(path) as tmp:
            yield tmp
    except OSError as error:
        raise RunError(f"cannot write to folder {str(Path(path).parent)!r}: {error.strerror or error}") from None


def writable_folder(path: str | os.PathLike) -> Path:
    """Check a run's output folder can be made and written (nothing is created yet: a run that
    fails on bad input leaves no folder behind), and remove temporaries a killed write left there."""
    folder = Path(path)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is not a folder" if not existing.is_dir() else "is not writable"
        raise RunError(f"cannot write output folder {str(folder)!r}: {str(existing)!r} {reason}; "
                       "allowed: a folder you can create and write")
    if existing == folder:
        for leftover in folder.iterdir():
            if _LEFT_BY_A_KILLED_WRITE.fullmatch(leftover.name) and leftover.is_file():
                leftover.unlink(missing_ok=True)
    return folder


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"file {str(path)!r} is not valid JSON ({error}); it may be truncated") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a ``torch.save`` file read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - not safetensors: try the weights-only torch format
        pass
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - anything unreadable is one clear message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error):  # torch's advice is the unsafe load
            first_line = "it holds pickled Python objects, which evolq does not load"
        raise RunError(
            f"checkpoint {str(path)!r} is neither a safetensors file nor a weights-only torch file "
            f"(corrupted, truncated or pickled objects?): {first_line[:200]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"checkpoint {str(path)!r} does not hold a dict of tensors")
    return state


def load_weights(model: torch.nn.Module, path: str | os.PathLike, name: str) -> torch.nn.Module:
    """Load a checkpoint file (see :func:`load_tensors`) into ``model``, architecture ``name``; one-line errors."""
    state = load_tensors(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        detail = " ".join(str(error).split())[:300]
        raise UsageError(f"checkpoint {str(path)!r} does not fit {name!r} ({detail}); "
                         "allowed: a state dict of this architecture") from None
    if missing or unexpected:
        raise UsageError(f"checkpoint {str(path)!r} does not fit {name!r}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; allowed: a state dict of this architecture")
    return model
