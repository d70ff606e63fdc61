"""One-file search checkpoint: scales, progress and history, replaced atomically after every block visit.

Everything lives in one safetensors file (the progress as JSON in its metadata), so a kill at
any moment leaves either the previous checkpoint or the next one, never a mix of two.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from evolq.errors import RunError, UsageError
from evolq.files import save_tensors
from evolq.qmodel import QuantizedModel

CHECKPOINT_NAME = "checkpoint.safetensors"


class SearchCheckpoint:
    """Save and load a search's state in ``folder``; ``fingerprint`` guards against resuming another run.

    The scales saved are the blocks' vectors in the search's ``space`` (all that a search changes).
    """

    def __init__(self, folder: str | Path, fingerprint: dict | None = None, space: str = "paper") -> None:
        self.path = Path(folder) / CHECKPOINT_NAME
        self.fingerprint = fingerprint or {}
        self.space = space

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, qmodel: QuantizedModel, visits_done: int, history: list[dict], pass_log: list[dict],
             best: dict) -> None:
        tensors = {f"current.{k}": v for k, v in qmodel.scales(self.space).items()}
        tensors.update({f"best.{k}": v for k, v in best["scales"].items()})
        meta = dict(
            visits_done=visits_done,
            history=history,
            pass_log=pass_log,
            best={k: v for k, v in best.items() if k != "scales"},
            fingerprint=self.fingerprint,
        )
        save_tensors(self.path, tensors, metadata={"state": json.dumps(meta)})

    def load(self, qmodel: QuantizedModel) -> tuple[int, list[dict], list[dict], dict]:
        """Restore the model's current scales; return visits done, history, pass log and best pass."""
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["state"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # noqa: BLE001 - any unreadable file is one clear message
            raise RunError(f"checkpoint {str(self.path)!r} is corrupted or truncated ({type(error).__name__}); "
                           "delete it to start over") from None
        theirs = meta.get("fingerprint", {})
        changed = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if changed:
            key = changed[0]
            raise UsageError(
                f"--resume folder {str(self.path.parent)!r} was written with {key}={theirs.get(key)!r}, "
                f"this run has {key}={self.fingerprint.get(key)!r}; allowed: the same configuration, or a new --out"
            )
        qmodel.load_scales({k.removeprefix("current."): v for k, v in tensors.items() if k.startswith("current.")},
                           self.space)
        best = dict(meta["best"], scales={k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")})
        return int(meta["visits_done"]), meta["history"], meta["pass_log"], best
