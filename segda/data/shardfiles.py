"""Facts about whole shard files: where each sample's bytes lie (the index a manifest records) and whether a shard
still matches its manifest's hash. Used by `segda index`, the creators and training's indexing of old manifests.
"""

from __future__ import annotations

import hashlib
import tarfile

from webdataset.tariterators import base_plus_ext

from segda.data.sources import open_url
from segda.log import SegdaError


def index_tar(fileobj, streaming: bool = False) -> list[list]:
    """[key, byte offset, byte size] of each sample of a tar, in tar order: the "samples" of a manifest entry.

    Reads only the member headers when `fileobj` can seek (a local file), so indexing a shard is cheap;
    `streaming` reads a stream that cannot seek (a remote shard) once from start to end.
    """
    samples: list[list] = []
    with tarfile.open(fileobj=fileobj, mode="r|" if streaming else "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key = base_plus_ext(member.name)[0]
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if samples and samples[-1][0] == key:
                samples[-1][2] = end - samples[-1][1]
            else:
                samples.append([key, member.offset, end - member.offset])
    return samples


def verify_shard(url: str, sha256: str | None, *, timeout: float = 30.0, retries: int = 5) -> None:
    """Hash the shard at `url` whole and compare it with its manifest's `sha256` (data.verify); SegdaError when
    they differ, naming the shard."""
    if not sha256:
        return
    digest = hashlib.sha256()
    with open_url(url, timeout=timeout, retries=retries) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise SegdaError(f"shard {url}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                         f"{sha256[:12]}... (data.verify): re-download or re-create the shard")


class HashingReader:
    """A read-only stream that hashes (sha256) and counts what passes through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data
