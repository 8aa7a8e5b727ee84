"""Local paths and file:// URLs: regular files only (a FIFO or a device would hang or never end a read)."""

from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request
from typing import BinaryIO

from segda.log import SegdaError


def path_of(url: str, scheme: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme else url


def open_file(path: str) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open itself
    except FileNotFoundError:
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise SegdaError(f"no such file: {path}{where}; check the path and that the shards were written") from None
    except OSError as e:
        raise SegdaError(f"cannot open {path}: {e.strerror}; check it is a readable file") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise SegdaError(f"{path} is {kind}: shards and manifests must be regular files")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_range(path: str, offset: int, size: int) -> tuple[bytes, int]:
    """(bytes [offset, offset + size) or fewer at the end, the file's size)."""
    with open_file(path) as f:
        total = os.fstat(f.fileno()).st_size
        f.seek(offset)
        return f.read(size), total
