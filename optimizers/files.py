"""Atomic file writes: a file is either its old or its new complete version, never half of each.

The one writer of ``optimizers`` and ``evolq`` (which adds its error type on top, in
``evolq.files``); ``landscapes``, which imports neither, keeps its own for figures.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The names of the temporary files atomic_path makes beside a target: ".<name>.<random>.tmp".
TEMPORARY_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{6,}\.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and rename it onto ``path``.

    Makes the folder. The file gets an ordinary new file's permissions (the umask's), not
    mkstemp's 0600. On any failure the temporary file is removed and ``path`` keeps its old
    content; failures of the file system are ``OSError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
