"""A run folder has one owner: the command writing it holds a lock on RUN_DIR/.segda-lock for its whole life, and
a folder that already holds a run is never written over by accident.

    with claim(out, command="pretrain", resume=None, overwrite=False, is_main=True):
        ...  # train; the lock goes with the process, however it ends (kill -9 included)

- A folder whose lock another live process holds is refused, naming that process (two trainers on one --out).
  The lock is the kernel's: a process that died, however, left no lock behind. It is a POSIX record lock
  (`lockf`), which belongs to the process alone: a DataLoader worker forked from a trainer killed with -9 lives on
  for a while, and with `flock` it would have kept the folder locked (the lock of an inherited descriptor).
- A folder that holds a finished, failed or interrupted run (run.json, a model, an adapter, checkpoints, a
  report) is refused unless the command says what to do with it: `--resume auto` continues it, `--overwrite`
  moves it aside to NAME.old-YYYYmmdd-HHMMSS (never deleted), or another --out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from segda.compat import upgrade_checkpoint_state
from segda.log import SegdaError, info

LOCK = ".segda-lock"
RUN_MARKERS = ("run.json", "model", "adapter", "checkpoints", "metrics.jsonl")
STUDY_MARKERS = ("report.json", "runs", "shards", "raw", "logs")
"""What makes a folder hold a training run, or a `segda demo` study."""
STATE = "state.json"
"""A checkpoint folder's JSON part (segda.train.checkpointer): its presence marks the folder complete."""
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


_HELD: dict[tuple[int, int], str] = {}
"""The lock files this process holds, by (device, inode): what they are held for."""


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Owner:
    """The lock of one folder, held until `release` or the end of the process."""

    def __init__(self, folder: Path, command: str):
        self.folder, self.command, self._fd = folder, command, None

    def acquire(self) -> "Owner":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        # A POSIX lock does not refuse its own process, and closing any descriptor of the file drops it: a second
        # claim from this process is refused before the file is opened again.
        held = _HELD.get(_file_id(path)) if path.exists() else None
        if held:
            raise SegdaError(f"{self.folder} is already being written by this process ({held}): choose another --out")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise SegdaError(f"cannot lock {path}: {err.strerror} (a filesystem without locks?); choose an --out "
                                 "on a local disk or a filesystem with locking") from None
            holder = _describe(fd)
            os.close(fd)
            raise SegdaError(f"{self.folder} is being written by {holder}: wait for it to finish, stop it, or choose "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd, self._id = fd, _file_id(path)
        _HELD[self._id] = f"segda {self.command}"
        return self

    def release(self) -> None:
        if self._fd is not None:
            _HELD.pop(self._id, None)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "Owner":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_summary(folder: str | Path) -> dict | None:
    """The run.json a run folder holds (what `segda pretrain`/`adapt` record), or None if it has none readable."""
    try:
        summary = json.loads((Path(folder) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def holds(folder: Path, markers=RUN_MARKERS) -> list[str]:
    """The markers of an earlier run or study found in `folder`."""
    return [m for m in markers if (folder / m).exists() or (m == "adapter" and any(folder.glob("adapter-*")))]


def check_flags(resume: str | None, overwrite: bool) -> None:
    if resume and overwrite:
        raise SegdaError("--resume continues the run in --out and --overwrite moves it aside: give one of them")


def claim(folder: str | Path, *, command: str, resume: str | None, overwrite: bool, is_main: bool = True,
          markers=RUN_MARKERS) -> Owner | None:
    """Check that `folder` may be written (module docstring) and, on the main process, take its lock; other
    processes of the same run only check (they refuse what the main process refuses). Returns the lock held."""
    folder = Path(folder)
    check_flags(resume, overwrite)
    found = holds(folder, markers) if folder.is_dir() else []
    if found and not resume and not overwrite:
        raise SegdaError(f"{folder} already holds a run ({', '.join(found)}): continue it with --resume auto, "
                         f"write elsewhere with another --out, or move it aside with --overwrite (it is renamed, "
                         "never deleted)")
    if not is_main:
        return None
    if found and overwrite:
        with Owner(folder, command).acquire():  # refused while its owner is alive
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            while aside.exists():
                aside = aside.with_name(aside.name + "+")
            os.rename(folder, aside)
        info(f"{folder} held an earlier run: moved it to {aside}")
    return Owner(folder, command).acquire()


def _describe(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"segda {holder['command']} (process {holder['pid']} on {holder['host']} since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another segda process"


# Checkpoints are found and their state.json read without torch: the `segda` command checks a resume before it loads.

def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of run_dir (None if there is none); a path: that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise SegdaError(f"--resume {resume}: no checkpoint there (expected {path}/{STATE}); "
                         f"use --resume auto to take the newest under {run_dir}/checkpoints")
    return path


def read_checkpoint_state(path: Path) -> dict:
    """A checkpoint's state.json, in the current layout (older layouts are upgraded: segda.compat)."""
    try:
        return upgrade_checkpoint_state(json.loads((path / STATE).read_text()))
    except (OSError, ValueError) as err:
        raise SegdaError(f"cannot read {path / STATE} ({err}); resume from another checkpoint") from err
