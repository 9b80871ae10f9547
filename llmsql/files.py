"""File-system helpers shared by everything that writes files atomically."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str], /) -> None:
    """Flush ``path`` (a file, or a folder: its entries, e.g. after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
