"""One place for console output: messages go to stderr, and only from the main process when told so.

Data and library code call `info`/`warn`; the trainers set `set_main_process(False)` on non-zero ranks so a
multi-process run prints each line once.
"""

from __future__ import annotations

import sys

_is_main = True


def set_main_process(is_main: bool) -> None:
    global _is_main
    _is_main = is_main


def is_main_process() -> bool:
    return _is_main


def info(message: str) -> None:
    if _is_main:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Warnings print on every rank: a bad shard seen by rank 3 must not go unreported."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class SegdaError(Exception):
    """A user-facing error: the message names the file, URL or config key and says how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """
