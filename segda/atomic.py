"""Atomic, durable writes: a file or folder appears under its final name only once it is complete and on disk.

Everything segda writes that another process may read (shards, manifests, checkpoints, models, adapters, reports)
goes through here, so a crash, kill -9 or power loss leaves either the old version or the new one, never half.

What "atomic" means here:
- a file is written under a temporary name beside its final one, fsynced, renamed over the final name, and the
  folder holding it is fsynced (the rename itself is then on disk);
- a folder (a model, an adapter, a checkpoint) is assembled under a temporary name; every file in it and the folder
  itself are fsynced; then it takes the final name in one step: renamed, or, when an old version is there,
  exchanged with it (Linux renameat2 RENAME_EXCHANGE) before the old one is deleted. Where the filesystem cannot
  exchange, the old folder is renamed aside first: a crash between the two renames leaves the old version under
  NAME.segda-tmp-old and no NAME, never a mixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

TMP_MARK = ".segda-tmp-"
"""Part of every temporary name, so stale leftovers of a killed run are recognisable and removable."""
_NAME_MAX = 255
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_name(final: Path, tag: str = "") -> Path:
    """A temporary path beside `final` whose name fits NAME_MAX however long the final name is."""
    suffix = TMP_MARK + (tag or secrets.token_hex(4))
    room = _NAME_MAX - len(suffix.encode())
    stem = final.name.encode()[:room].decode("utf-8", "ignore")
    return final.with_name(stem + suffix)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; write a file or a folder there; on success it takes the final name
    (see the module docstring), on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        if tmp.is_dir():
            publish_dir(tmp, final)
        else:
            _fsync_file(tmp)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the complete folder `tmp` durable, then give it the name `final` in one step (module docstring)."""
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))
    if final.is_dir() and not final.is_symlink():
        if not _exchange(tmp, final):
            old = temp_name(final, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            tmp = old
        shutil.rmtree(tmp, ignore_errors=True)  # the old version, now under the temporary name
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or filesystem cannot."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open folders (Windows) cannot fsync them either
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the data files themselves are synced
    finally:
        os.close(fd)


_LIBC: list = []


def _libc():
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            _LIBC.append(ctypes.CDLL(name, use_errno=True) if name else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
