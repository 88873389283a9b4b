"""Library (every stage): the one atomic writer. A file or directory appears under its name whole or not at
all: it is written under a temporary name unique to this process in the same directory, fsynced, renamed, and
the directory entry fsynced. Two writers of one name never share a temporary file; the last rename wins.

Imports only the standard library (numpy lazily), so the config and plan layers may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(str(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under `directory`, then every directory (deepest first) and `directory` itself."""
    root = Path(directory)
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            dirs.append(p)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a temporary file next to `path`; it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=str))


def save_npy_atomic(path: str | os.PathLike, arr) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to a path
            np.save(fh, arr)

    return atomic_write(path, write)


def replace_dir(tmp: Path, final_dir: Path) -> None:
    """Rename the complete dir tmp to final_dir. An existing final_dir is moved aside first and removed only
    after the rename, so at every instant one complete copy exists under one of the two names."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_save_dir(save_fn: Callable[[Path], None], final_dir: str | os.PathLike) -> Path:
    """save_fn(tmp_dir) fills a temporary dir; it is fsynced and renamed to final_dir (never half-written)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        save_fn(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
