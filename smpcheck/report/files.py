"""Writing a file so that a reader finds it whole or not at all.

Shared by the rank marks a launcher polls for (:mod:`smpcheck.run.launch`,
:mod:`smpcheck.run.whereabouts`) and the report writers: a disk that fills up or turns
read-only mid-write leaves the previous file, or none, never half a JSON report that
``smpcheck report`` would choke on.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a partial file beside ``path``, then rename it into place; on any
    error the partial file is removed and the error raised."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
