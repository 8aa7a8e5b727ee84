"""The one bad-data policy of every reader and stream: a bad sample (truncated shard, corrupt tar member or image,
missing image or label, sha256 mismatch) is skipped with a warning naming the shard and key, and counted; with
`strict` it raises instead. Streams refill the skipped sample's batch slot and report the counts per epoch.

    bad = BadSamples(strict=False)
    bad.report(f"sample {key} in {url} is corrupt; skipped")   # warns (rate-limited per process) and counts
    n = bad.take()                                              # the count since the last take, reset to 0
"""

from __future__ import annotations

from contextlib import contextmanager

from segda.log import SegdaError, warn_limited


class BadSamples:
    def __init__(self, strict: bool = False):
        self.strict = strict
        self.count = 0
        """Bad samples seen since the last `take`."""

    def report(self, message: str, count: int = 1) -> None:
        if self.strict:
            raise SegdaError(message + " (strict mode; set data.strict=false to skip bad data)")
        warn_limited("bad sample", message)
        self.count += count

    def take(self) -> int:
        count, self.count = self.count, 0
        return count

    @contextmanager
    def not_counted(self):
        """Samples read here (borrowed from another batch) are reported but counted with their own batch."""
        before = self.count
        try:
            yield
        finally:
            self.count = before
