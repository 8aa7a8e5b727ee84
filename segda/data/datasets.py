"""Name a dataset by its manifest or by a shard URL pattern; get its shards, their sample counts and hashes.

    ds = resolve_dataset("s3://bucket/gta5/train-manifest.json")
    ds = resolve_dataset("https://host/gta5/train-{000000..000023}.tar")   # counts unknown until counted
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from segda.data.sources import expand_urls, join_url, open_url, read_bytes, url_scheme
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


def resolve_dataset(spec: str, *, allow_pipe: bool = False) -> Dataset:
    if not spec:
        raise SegdaError("no dataset given: set data.train / data.val (a manifest or a shard URL pattern)")
    if spec.endswith(".json"):
        return _from_manifest(spec, allow_pipe)
    urls = expand_urls(spec)
    if not urls:
        raise SegdaError(f"the shard pattern {spec!r} expands to no URL")
    return Dataset(spec, [Shard(u) for u in urls])


def _from_manifest(spec: str, allow_pipe: bool) -> Dataset:
    try:
        manifest = json.loads(read_bytes(spec, allow_pipe=allow_pipe))
    except ValueError as err:
        raise SegdaError(f"{spec} is not a JSON manifest ({err}); was it written by `segda shards`?") from err
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise SegdaError(f"{spec} has no 'shards' list: is it a segda manifest (written by `segda shards`)?")
    shards = []
    for n, entry in enumerate(manifest["shards"]):
        if url_scheme(str(entry.get("url", ""))) == "pipe":
            # allow_pipe covers URLs the user typed, never commands that a (possibly remote) manifest supplies.
            raise SegdaError(f"{spec}: shard entry {n} is a pipe: command; manifests may only list files and URLs")
        try:
            shards.append(Shard(join_url(spec, entry["url"]), int(entry["num_samples"]), entry.get("sha256"),
                                entry.get("bytes"), _sample_index(entry)))
        except (KeyError, TypeError, ValueError) as err:
            raise SegdaError(f"{spec}: shard entry {n} is malformed ({err}); re-create the shards") from err
    if not shards:
        raise SegdaError(f"{spec} lists no shards")
    ds = Dataset(spec, shards, manifest)
    if not ds.indexed:
        warn(f"{spec} has no per-sample byte offsets (written by segda < 0.2): each reader streams its shards from "
             "byte 0, which fetches several times the bytes it uses at many ranks and keeps frames in shard order. "
             "Add them with `segda index MANIFEST` where the shards are on disk, or re-run `segda shards`")
    return ds


def _sample_index(entry: dict) -> tuple[tuple[str, int, int], ...] | None:
    """The shard entry's "samples" ([key, offset, size] each), checked against its count and size."""
    if "samples" not in entry:
        return None
    samples = tuple((str(key), int(offset), int(size)) for key, offset, size in entry["samples"])
    if len(samples) != int(entry["num_samples"]):
        raise ValueError(f"'samples' lists {len(samples)} samples but 'num_samples' is {entry['num_samples']}")
    end = 0
    for key, offset, size in samples:
        if offset < end or size <= 0 or (entry.get("bytes") is not None and offset + size > int(entry["bytes"])):
            raise ValueError(f"sample {key!r} has a bad byte range [{offset}, {offset + size})")
        end = offset + size
    return samples


def with_counts(ds: Dataset, *, allow_pipe: bool = False) -> Dataset:
    """Fill in unknown per-shard sample counts by reading the shards once (a manifest makes this free)."""
    if ds.counts_known:
        return ds
    info(f"counting samples in {len(ds.shards)} shard(s) of {ds.spec} (point at the manifest to skip this)")
    import tarfile

    from webdataset.tariterators import base_plus_ext

    shards = []
    for shard in ds.shards:
        keys = set()
        try:
            with open_url(shard.url, allow_pipe=allow_pipe) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isreg():
                        keys.add(base_plus_ext(member.name)[0])
        except (tarfile.TarError, OSError, EOFError) as err:
            raise SegdaError(f"cannot count the samples of {shard.url}: {err} (a corrupt shard? re-create it, "
                             "or train from the manifest)") from err
        shards.append(Shard(shard.url, len(keys), shard.sha256))
    return Dataset(ds.spec, shards, ds.manifest)
