"""Read raw samples ({"__key__", "__url__", image bytes, "label.png", ...}) out of WebDataset shards.

Two readers, one bad-data policy:

- `SampleReader` reads samples by (shard, position) with the byte ranges an indexed manifest records: a seek for
  local files, one Range request for HTTP and S3. Neighbouring samples of one shard are fetched together (up to
  `MAX_REQUEST_BYTES`), so an evaluation worker's contiguous share costs a few requests and a shuffled training
  batch one request per sample. Only the bytes of planned samples are fetched.
- `ShardReader` streams a shard from byte 0 and keeps the samples of a [start, stop) window: for shard URL
  patterns, manifests without offsets, and `data.verify` (hashing a shard means reading all of it).

Bad data (truncated shard, corrupt tar member, missing image or label, sha256 mismatch) goes to the reader's
`bad` policy (`segda.data.bad.BadSamples`: skipped with a warning, counted; `strict` raises). A source that cannot be
read at all (missing file, HTTP 404, a shard replaced since its manifest) raises SegdaError: no training on a hole.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

from webdataset.tariterators import group_by_keys, tar_file_iterator

from segda.data.bad import BadSamples
from segda.data.datasets import Dataset
from segda.data.sources import open_url, read_range

IMAGE_EXTS = ("pxz", "png", "jpg", "jpeg", "webp", "bmp")
LABEL_EXT = "label.png"
MAX_REQUEST_BYTES = 32 << 20
"""Neighbouring samples are fetched in one request up to this size (a dozen 2-megapixel PNG frames)."""
_TAR_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError)


class _Reader:
    """What both readers share: the bad-data policy and what makes a sample complete."""

    def __init__(self, bad: BadSamples | None, strict: bool, labeled: bool):
        self.bad = bad if bad is not None else BadSamples(strict)
        self.labeled = labeled
        """False for image-only shards (`segda shards images`): a sample without a label is then complete."""

    def _complete(self, sample: dict, url: str) -> bool:
        if self.labeled and LABEL_EXT not in sample:
            self.bad.report(f"sample {sample['__key__']} in {url} has no label ({LABEL_EXT}); skipped")
            return False
        if not any(ext in sample for ext in IMAGE_EXTS):
            self.bad.report(f"sample {sample['__key__']} in {url} has no image ({'/'.join(IMAGE_EXTS)}); skipped")
            return False
        return True


def is_labeled(ds: Dataset) -> bool:
    return (ds.manifest or {}).get("labeled") is not False


class SampleReader(_Reader):
    """Random access to the samples of an indexed dataset (`ds.indexed`), `threads` requests in flight.

    Remote reads are latency-bound (a round trip per request), so `fetch` starts a batch's requests on a small
    thread pool and `read` parses them in order; a caller that fetches the next batch before decoding this one
    hides the latency behind the decoding.
    """

    def __init__(self, ds: Dataset, *, strict: bool = False, threads: int = 4,
                 max_request: int = MAX_REQUEST_BYTES, timeout: float = 30.0, retries: int = 5,
                 bad: BadSamples | None = None):
        super().__init__(bad, strict, labeled=is_labeled(ds))
        self.timeout, self.retries = timeout, retries
        if not ds.indexed:
            raise ValueError(f"{ds.spec} has no per-sample byte offsets; use ShardReader")
        self.ds, self.max_request, self.threads = ds, max_request, max(1, threads)
        self._pool: ThreadPoolExecutor | None = None  # made on first use: after the loader worker's fork

    def fetch(self, items: Sequence[tuple[int, int]]) -> list[tuple[int, list[int], Future]]:
        """Start reading the samples at (shard, position) `items`; pass the result to `read`."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="segda-read")
        return [(shard, positions, self._pool.submit(self._fetch_run, shard, positions))
                for shard, positions in self._runs(items)]

    def read(self, items: Sequence[tuple[int, int]] | list[tuple[int, list[int], Future]]) -> Iterator[dict | None]:
        """One raw sample per item, in order (items: (shard, position) pairs, or what `fetch` returned); None for a
        sample that is bad (counted and reported)."""
        fetched = items if items and isinstance(items[0][-1], Future) else self.fetch(items)
        for shard, positions, future in fetched:
            yield from self._parse_run(shard, positions, future)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _runs(self, items: Sequence[tuple[int, int]]) -> Iterator[tuple[int, list[int]]]:
        """Consecutive positions of one shard, grouped while their bytes stay under `max_request`."""
        run: list[int] = []
        run_shard = -1
        for shard, position in items:
            spec = self.ds.shards[shard].samples
            adjacent = shard == run_shard and run and position == run[-1] + 1
            if adjacent and spec[position][1] + spec[position][2] - spec[run[0]][1] <= self.max_request:
                run.append(position)
                continue
            if run:
                yield run_shard, run
            run_shard, run = shard, [position]
        if run:
            yield run_shard, run

    def _fetch_run(self, shard: int, positions: list[int]) -> bytes:
        info = self.ds.shards[shard]
        first, last = info.samples[positions[0]], info.samples[positions[-1]]
        return read_range(info.url, first[1], last[1] + last[2] - first[1], expect_total=info.bytes,
                          timeout=self.timeout, retries=self.retries)

    def _parse_run(self, shard: int, positions: list[int], future: Future) -> Iterator[dict | None]:
        info = self.ds.shards[shard]
        try:
            blob = future.result()
        except EOFError as err:  # the shard is shorter than its index: keep the samples that are there
            if len(positions) > 1:
                for position in positions:
                    yield from self._parse_run(shard, [position], _done(self._fetch_run, shard, [position]))
                return
            self.bad.report(f"shard {info.url} is shorter than its manifest says ({err}); sample "
                      f"{info.samples[positions[0]][0]} lost")
            yield None
            return
        start = info.samples[positions[0]][1]
        for position in positions:
            key, offset, size = info.samples[position]
            yield self._parse(blob[offset - start: offset - start + size], key, info.url)

    def _parse(self, data: bytes, key: str, url: str) -> dict | None:
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)))
            samples = list(group_by_keys(files))
        except _TAR_ERRORS as err:
            self.bad.report(f"sample {key} in {url} is corrupt ({type(err).__name__}: {err}); skipped")
            return None
        if [s["__key__"] for s in samples] != [key]:
            found = [s["__key__"] for s in samples]
            self.bad.report(f"the manifest says sample {key} is in {url} where the tar holds {found}: the manifest does not "
                      "belong to this shard; re-create the shards with `segda shards`")
            return None
        return samples[0] if self._complete(samples[0], url) else None


def _done(fn, *args) -> Future:
    """A future already holding fn(*args) or its exception (for synchronous re-reads)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as err:  # handed to whoever calls .result(), as a pool would
        future.set_exception(err)
    return future


class ShardReader(_Reader):
    """Streams shards from byte 0, yielding the samples of a [start, stop) window of tar positions."""

    def __init__(self, ds: Dataset, *, strict: bool = False, verify: bool = False, allow_pipe: bool = False,
                 timeout: float = 30.0, retries: int = 5, bad: BadSamples | None = None):
        super().__init__(bad, strict, labeled=is_labeled(ds))
        self.ds, self.verify, self.allow_pipe = ds, verify, allow_pipe
        self.timeout, self.retries = timeout, retries

    def segment(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        url = self.ds.shards[shard].url
        position = 0
        try:
            with self._open(shard) as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for sample in group_by_keys(files):
                    if stop is not None and position >= stop:
                        return
                    position += 1
                    if position <= start:
                        continue
                    if self._complete(sample, url):
                        yield sample
            lost = self._lost(shard, start, stop, position)
            if lost:  # a tar that ends early, on a member boundary
                self.bad.report(f"shard {url} holds {position} samples, the manifest says at least "
                          f"{max(position, start) + lost}: {lost} planned sample(s) lost", lost)
        except _TAR_ERRORS as err:
            lost = self._lost(shard, start, stop, position)
            self.bad.report(f"shard {url} is corrupt or truncated after {position} samples ({type(err).__name__}: "
                      f"{err}); {lost} planned sample(s) lost", lost)

    def _lost(self, shard: int, start: int, stop: int | None, position: int) -> int:
        """Planned samples of [start, stop) never reached (stop None: up to the manifest's count, if known)."""
        end = stop if stop is not None else self.ds.shards[shard].num_samples
        return max(0, (end if end is not None else position) - max(position, start))

    def _open(self, shard: int):
        info = self.ds.shards[shard]
        stream = open_url(info.url, allow_pipe=self.allow_pipe, timeout=self.timeout, retries=self.retries)
        if not (self.verify and info.sha256):
            return stream
        # Refusing a bad shard means hashing it before yielding anything from it: spool it, hash, then read.
        spool = tempfile.SpooledTemporaryFile(max_size=256 << 20)
        digest = hashlib.sha256()
        with stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
                spool.write(chunk)
        if digest.hexdigest() != info.sha256:
            spool.close()
            raise ValueError(f"sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                             f"{info.sha256[:12]}...: re-download or re-create the shard")
        spool.seek(0)
        return spool
