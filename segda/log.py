"""One place for console output: messages go to stderr, and only from the main process when told so.

Data and library code call `info`/`warn`; the trainers set `set_main_process(False)` on non-zero ranks so a
multi-process run prints each line once. Warnings that can repeat thousands of times (a bad sample, a retried
read) go through `warn_limited`: the first few of each kind print, the rest are counted and summed up once.
"""

from __future__ import annotations

import sys
from collections import Counter

_is_main = True
LIMIT = 5
"""Warnings of one kind printed per process before the rest are only counted."""
_seen: Counter = Counter()


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


def warn_limited(kind: str, message: str) -> None:
    """`warn` for the first LIMIT warnings of `kind` in this process; later ones are counted (`suppressed`)."""
    _seen[kind] += 1
    if _seen[kind] <= LIMIT:
        warn(message)
    if _seen[kind] == LIMIT:
        warn(f"further {kind} warnings of this process are counted, not printed (a total follows)")


def report_suppressed() -> None:
    """Print how many warnings of each kind were not printed, and forget them (loader workers call it on exit)."""
    for kind, count in sorted(_seen.items()):
        if count > LIMIT:
            warn(f"{count - LIMIT} more {kind} warning(s) of this process were not printed ({count} in all)")
    _seen.clear()


class SegdaError(Exception):
    """A user-facing error: the message names the file, URL or config key and says how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """
