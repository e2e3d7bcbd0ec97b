"""Write outputs so that a failed run leaves nothing half-written.

Every command builds its output in a temporary sibling folder and renames it into place only
when everything succeeded (rename is atomic on one file system).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if `path` exists, is not empty and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path exists and is not a folder: {path}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder is not empty: {path} (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `path`, on error it is deleted."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)  # only now: a run that fails early creates nothing
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
