"""Save a figure atomically: the file at ``path`` is the old one or the complete new one, never half."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the extension, e.g. .png, .pdf, .svg) and return the path.

    The figure goes to a temporary file in the same folder first and is renamed over ``path``,
    so an interrupted save never leaves a truncated figure behind.
    """
    path = Path(path)
    formats = fig.canvas.get_supported_filetypes()
    extension = path.suffix.lower().lstrip(".")
    if extension not in formats:
        raise ValueError(f"figure path {str(path)!r} has extension {path.suffix!r}; use one of {sorted(formats)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Opened by name, not with mkstemp, so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as stream:
            fig.savefig(stream, format=extension, dpi=dpi)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
