"""Name a dataset by its manifest or by a shard URL pattern; get its shards, their sample counts and hashes.

    ds = resolve_dataset("s3://bucket/gta5/train-manifest.json")
    ds = resolve_dataset("https://host/gta5/train-{000000..000023}.tar")   # counts unknown until counted
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from segda.data.shardfiles import index_tar, verify_shard
from segda.data.sources import expand_urls, join_url, local_path, open_url, read_bytes, url_scheme
from segda.log import SegdaError, info, warn


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    """The tar's size; a remote object of another size was replaced after the manifest was written."""
    samples: tuple[tuple[str, int, int], ...] | None = field(default=None, repr=False)
    """(key, byte offset, byte size) of each sample's members in the tar, in tar order: what random access needs."""


@dataclass
class Dataset:
    spec: str
    shards: list[Shard]
    manifest: dict | None = field(default=None, repr=False)

    @property
    def counts_known(self) -> bool:
        return all(s.num_samples is not None for s in self.shards)

    @property
    def num_samples(self) -> int | None:
        return sum(s.num_samples for s in self.shards) if self.counts_known else None

    @property
    def indexed(self) -> bool:
        """Every sample's byte range is known: samples can be read one by one (seek or Range request)."""
        return all(s.samples is not None for s in self.shards)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in the shard) of global sample `index` (shards laid end to end in manifest order)."""
        if self._starts is None:
            self._starts = np.cumsum([0] + [s.num_samples for s in self.shards])
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    _starts: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def groups(self) -> tuple[str, ...]:
        """ACDC's conditions (sample keys start with `<condition>_`): evaluation reports each one too."""
        return tuple((self.manifest or {}).get("conditions") or ())

    def require_labels(self, use: str) -> "Dataset":
        if (self.manifest or {}).get("labeled") is False:
            raise SegdaError(f"{self.spec} holds unlabeled images (made by `segda shards images`): {use} needs "
                             "labelled shards")
        return self


def resolve_dataset(spec: str, *, allow_pipe: bool = False, timeout: float = 30.0, retries: int = 5) -> Dataset:
    """The dataset a manifest or shard pattern names. A manifest is recognised by its name (.json, query string
    aside) or, for a single URL whose name does not say (not .tar), by its first byte; `timeout` and `retries` are
    data.timeout and data.retries."""
    if not spec:
        raise SegdaError("no dataset given: set data.train / data.val (a manifest or a shard URL pattern)")
    fetch = {"allow_pipe": allow_pipe, "timeout": timeout, "retries": retries}
    if urllib.parse.urlsplit(spec.strip()).path.endswith(".json"):
        return _from_manifest(spec, fetch)
    urls = expand_urls(spec)
    unnamed = not urllib.parse.urlsplit(urls[0]).path.endswith(".tar")  # a presigned or extension-less URL
    if len(urls) == 1 and unnamed and url_scheme(spec) != "pipe" and _starts_like_json(urls[0], fetch):
        return _from_manifest(urls[0], fetch)
    if len(set(urls)) != len(urls):
        raise SegdaError(f"the shard pattern {spec!r} names a shard more than once: each sample would count twice")
    return Dataset(spec, [Shard(u) for u in urls])


def _starts_like_json(url: str, fetch: dict) -> bool:
    """A tar starts with a member name; a manifest with "{": one small read tells them apart."""
    try:
        with open_url(url, **fetch) as f:
            return f.read(64).lstrip()[:1] == b"{"
    except SegdaError:
        return False  # reported properly where the shard is read


def _from_manifest(spec: str, fetch: dict) -> Dataset:
    try:
        manifest = json.loads(read_bytes(spec, **fetch))
    except (ValueError, RecursionError) as err:
        raise SegdaError(f"{spec} is not a JSON manifest ({err}); was it written by `segda shards`?") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise SegdaError(f"{spec} has no 'shards' list: is it a segda manifest (written by `segda shards`)?")
    try:
        shards = [_shard_entry(spec, n, entry) for n, entry in enumerate(manifest["shards"])]
    except _BadField as err:
        raise SegdaError(f"{spec}: {err}; re-create the shards with `segda shards` (or fix the manifest)") from None
    if not shards:
        raise SegdaError(f"{spec} lists no shards")
    _refuse_repeats(spec, shards)
    ds = Dataset(spec, shards, manifest)
    if not ds.indexed:
        warn(f"{spec} has no per-sample byte offsets (written by segda < 0.2): training indexes local shards at "
             "each start and refuses remote ones, and evaluation streams whole shards. Store them once with "
             f"`segda index {spec}`, or re-run `segda shards`")
    return ds


def _refuse_repeats(spec: str, shards: list[Shard]) -> None:
    """A shard listed twice, or a sample key in two places, would be trained on and scored twice."""
    urls = [s.url for s in shards]
    if len(set(urls)) != len(urls):
        twice = next(u for u in urls if urls.count(u) > 1)
        raise SegdaError(f"{spec} lists the shard {twice} more than once: each sample would count twice; fix the "
                         "manifest or re-create the shards with `segda shards`")
    keys = [k for s in shards if s.samples for k, _, _ in s.samples]
    if len(set(keys)) != len(keys):
        seen = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise SegdaError(f"{spec} lists the sample {twice!r} more than once: fix the manifest or re-create the "
                         "shards with `segda shards`")


class _BadField(ValueError):
    """A manifest field that is missing or malformed; the message names it."""


def manifest_shard(spec: str, n: int, entry) -> Shard:
    """`shards[n]` of the manifest `spec`, validated; SegdaError naming the field otherwise."""
    try:
        return _shard_entry(spec, n, entry)
    except _BadField as err:
        raise SegdaError(f"{spec}: {err}; re-create the shards with `segda shards` (or fix the manifest)") from None


def _shard_entry(spec: str, n: int, entry) -> Shard:
    """One validated `shards[n]` entry of a manifest: every field checked, and named when wrong."""
    where = f"shards[{n}]"
    if not isinstance(entry, dict):
        raise _BadField(f"{where} is {type(entry).__name__}, not an object with url and num_samples")
    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _BadField(f"{where}.url is {url!r}: must be a file path or URL")
    if url_scheme(url) == "pipe":
        # allow_pipe covers URLs the user typed, never commands that a (possibly remote) manifest supplies.
        raise _BadField(f"{where}.url is a pipe: command; manifests may only list files and URLs")
    count = _whole(entry.get("num_samples"), f"{where}.num_samples")
    size = None if entry.get("bytes") is None else _whole(entry["bytes"], f"{where}.bytes")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise _BadField(f"{where}.sha256 is {sha!r}: must be 64 lowercase hex digits")
    return Shard(join_url(spec, url), count, sha, size, _sample_index(entry, where, count, size))


def _whole(value, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadField(f"{field_name} is {value!r}: must be a whole number >= 0")
    return value


def _sample_index(entry: dict, where: str, count: int, size: int | None) -> tuple[tuple[str, int, int], ...] | None:
    """The shard entry's "samples" ([key, offset, size] each), checked against its count and size."""
    if "samples" not in entry:
        return None
    listed = entry["samples"]
    if not isinstance(listed, list) or len(listed) != count:
        got = len(listed) if isinstance(listed, list) else type(listed).__name__
        raise _BadField(f"{where}.samples lists {got} samples but num_samples is {count}")
    samples, end = [], 0
    for i, item in enumerate(listed):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise _BadField(f"{where}.samples[{i}] is {item!r}: must be [key, offset, size]")
        key = item[0]
        offset, length = _whole(item[1], f"{where}.samples[{i}] offset"), _whole(item[2], f"{where}.samples[{i}] size")
        if offset < end or length == 0 or (size is not None and offset + length > size):
            raise _BadField(f"{where}.samples[{i}] ({key!r}) has a bad byte range [{offset}, {offset + length})")
        samples.append((key, offset, length))
        end = offset + length
    return tuple(samples)


def indexed_for_training(ds: Dataset, cfg, *, rank: int, world: int) -> Dataset:
    """The dataset as training reads it, sample by sample: byte offsets taken from the manifest, or read from the
    tar headers of local shards (seconds, no decoding); remote shards without offsets are refused with the command
    that indexes them. With data.verify, each rank hashes its share of the shards first."""
    if not ds.indexed:
        ds = _index_local(ds)
    if cfg.verify:
        if not any(s.sha256 for s in ds.shards):
            warn(f"data.verify is on but {ds.spec} carries no sha256 to check against: name the dataset by its "
                 "manifest to verify shards")
        for shard in range(rank, len(ds.shards), world):  # each shard hashed once, by one rank
            verify_shard(ds.shards[shard].url, ds.shards[shard].sha256, timeout=cfg.timeout, retries=cfg.retries)
    return ds


def _index_local(ds: Dataset) -> Dataset:
    remote = [s.url for s in ds.shards if url_scheme(s.url) not in ("", "file")]
    if remote:
        raise SegdaError(f"{ds.spec} has no per-sample byte offsets and its shards are remote ({remote[0]}, ...): "
                         "training reads samples one by one. Index them once with `segda index "
                         f"{ds.spec} --out indexed-manifest.json` (it reads each shard once) and train from that "
                         "manifest, or re-create the shards with `segda shards`")
    started, shards = time.perf_counter(), []
    for shard in ds.shards:
        path = local_path(shard.url)
        try:
            with open_url(shard.url) as fh:
                samples = index_tar(fh)
        except (OSError, ValueError, EOFError) as err:  # tarfile's errors are ValueErrors or OSErrors
            raise SegdaError(f"cannot index {path}: {err} (a corrupt shard? re-create it)") from err
        if shard.num_samples is not None and len(samples) != shard.num_samples:
            raise SegdaError(f"{path} holds {len(samples)} samples, {ds.spec} says {shard.num_samples}: re-create "
                             "the shards with `segda shards`")
        shards.append(Shard(shard.url, len(samples), shard.sha256, shard.bytes, tuple(map(tuple, samples))))
    info(f"indexed {sum(s.num_samples for s in shards)} samples in {len(shards)} local shard(s) of {ds.spec} from "
         f"their tar headers ({time.perf_counter() - started:.1f} s); `segda index` stores the offsets in a manifest")
    return Dataset(ds.spec, shards, ds.manifest)
