"""Atomic writes: a file appears under its final name only once it is complete.

Everything segda writes that another process may read (shards, manifests, checkpoints, adapters, reports) goes
through here, so a crash or kill -9 leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_MARK = ".segda-tmp-"
"""Part of every temporary name, so stale leftovers of a killed run are recognisable and removable."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it to `final`, on error delete it.

    Works for files and for directories (write a whole folder, then swap it in).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARK, dir=final.parent)) / "x"
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot swap a non-empty directory: move the old one aside first, then drop it.
            old = final.with_name(final.name + TMP_MARK + "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if tmp.is_file():
                _fsync(tmp)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


@contextlib.contextmanager
def os_errors(path: str | os.PathLike) -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as SafetensorError("... (os error 28)"): re-raise it as
    the OSError it is, naming `path`, so the CLI can say what happened instead of printing a traceback."""
    try:
        yield
    except Exception as err:
        found = re.search(r"os error (\d+)", str(err))
        if found and not isinstance(err, OSError):
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike, obj) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale(folder: str | os.PathLike, prefix: str = "") -> int:
    """Delete leftovers of killed writers in `folder` whose names start with `prefix` (not recursive).

    The prefix keeps two writers of one folder (say the train and val shards) from deleting each other's files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if TMP_MARK in entry.name and entry.name.startswith(prefix):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
