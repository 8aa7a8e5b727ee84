"""Write a split of a raw dataset as deterministic, atomic WebDataset tar shards plus a JSON manifest.

    segda shards gta5 ROOT [OUT] --shard-size 256 --workers 8

Samples are sorted by key and cut into shards of `shard_size` consecutive samples, so the same input and options
give byte-identical shards (fixed member order, mtime, owner and mode). Worker processes validate and encode
samples; the main process writes each shard to a temporary name and renames it when complete, then records it
under `.segda-parts/`. A killed run leaves no half shard, and running it again reuses the finished shards and
completes the rest. The manifest is written last.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import segda
from segda import atomic
from segda.classes import CLASS_NAMES, NUM_CLASSES
from segda.colourstats import summarise
from segda.log import SegdaError, info, warn
from segda.shards.encode import BadSample, EncodeOptions, Encoded, encode_sample
from segda.shards.layouts import LABELED, Orphan, RawSample, find_samples

MANIFEST_FORMAT = "segda.shards/2"
"""/2 adds each shard's "samples": [key, byte offset, byte size] per sample, for random access. Readers accept /1."""
PARTS_DIR = ".segda-parts"
_TAR_MTIME = 0  # fixed member metadata: byte-identical shards across runs and machines


@dataclass(frozen=True)
class CreateOptions:
    shard_size: int = 256
    """Samples per shard (~0.75 GB of GTA5 PNG frames at 256)."""
    workers: int = 1
    """Encoder processes."""
    strict: bool = False
    """Stop at the first bad sample instead of skipping and reporting it."""
    split_file: str | None = None
    """GTA5 only: split.mat or a text file of frame ids."""
    conditions: tuple[str, ...] | None = None
    """ACDC only: the weather conditions to include (default: every one present)."""
    images: str = "images"
    """folder datasets: the images' folder under the root."""
    labels: str = "labels"
    """folder datasets: the labels' folder under the root."""


def manifest_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}-manifest.json"


def create_shards(dataset: str, root: str | Path, out: str | Path, encode: EncodeOptions,
                  opts: CreateOptions, progress: bool = True) -> dict:
    """Create the shards and manifest of one split; return the manifest (also written to disk)."""
    if opts.shard_size < 1:
        raise SegdaError(f"--shard-size must be at least 1 (got {opts.shard_size})")
    samples, orphans = find_samples(dataset, root, encode.split, opts.split_file, conditions=opts.conditions,
                                    images=opts.images, labels=opts.labels)
    _report_orphans(orphans, opts.strict)
    if not samples:
        raise SegdaError(f"no complete (image, label) pairs found under {root} for split {encode.split!r}")
    if dataset == "folder" and encode.id_map is None:
        raise SegdaError("a folder dataset needs --id-map ids.yaml: which label value is which train id")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale(out, prefix=f"{encode.split}-")
    plan = [samples[i:i + opts.shard_size] for i in range(0, len(samples), opts.shard_size)]
    fingerprint = _fingerprint(encode, opts)
    parts = out / PARTS_DIR
    start = time.perf_counter()
    records = _write_all(plan, out, parts, encode, opts, fingerprint, progress)
    seconds = time.perf_counter() - start
    manifest = _manifest(dataset, root, encode, opts, records, orphans)
    if manifest["num_samples"] == 0:
        for record in records:  # no empty tars left under final names, no records a re-run would trust
            (out / record["url"]).unlink(missing_ok=True)
        for part in parts.glob(f"{encode.split}-*.json"):
            part.unlink()
        raise SegdaError(f"every sample under {root} was skipped ({manifest['num_skipped']} problems, see the "
                         "warnings above): no shards and no manifest written; fix the files and run again")
    atomic.write_json(manifest_path(out, encode.split), manifest)
    for part in parts.glob(f"{encode.split}-*.json"):  # only this split's: another may be writing beside it
        part.unlink()
    with contextlib.suppress(OSError):
        parts.rmdir()
    _summary(manifest, out, seconds)
    return manifest


def _write_all(plan, out: Path, parts: Path, encode, opts, fingerprint, progress) -> list[dict]:
    records: list[dict | None] = [_reusable(out, parts, encode.split, i, shard, fingerprint)
                                  for i, shard in enumerate(plan)]
    todo = [i for i, rec in enumerate(records) if rec is None]
    if len(todo) < len(plan):
        info(f"reusing {len(plan) - len(todo)} complete shard(s) from an earlier run")
    bar = tqdm(total=sum(len(plan[i]) for i in todo), unit="sample", desc=f"{encode.dataset}/{encode.split}",
               disable=not progress, smoothing=0.1)
    with _pool(opts.workers) as pool:
        for i in todo:
            results = _encode_shard(pool, plan[i], encode, opts.strict, bar)
            records[i] = _write_shard(out, parts, encode.split, i, plan[i], results, fingerprint)
    bar.close()
    return records


def _pool(workers: int):
    if workers <= 1:
        return _InlinePool()
    # fork: workers inherit imported cv2/numpy instantly; encoding holds no locks or threads worth worrying about.
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                  initializer=_die_with_parent, initargs=(os.getpid(),))


def _die_with_parent(parent: int) -> None:
    """An encoder worker must not outlive a creator killed with kill -9 (nothing else would ever stop it): ask
    Linux to send it SIGKILL when its parent dies, and leave at once if that already happened."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still applies to normal exits
        return
    if os.getppid() != parent:
        os._exit(1)


class _InlinePool:
    def map(self, fn, items, chunksize=1):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _encode_one(args) -> Encoded | Orphan:
    sample, encode = args
    try:
        return encode_sample(sample, encode)
    except BadSample as err:
        return Orphan(sample.rel(getattr(sample, err.which)), str(err))


def _encode_shard(pool, shard: list[RawSample], encode, strict: bool, bar) -> list[Encoded | Orphan]:
    results = []
    for result in pool.map(_encode_one, [(s, encode) for s in shard], chunksize=4):
        if isinstance(result, Orphan):
            if strict:
                raise SegdaError(f"{result.file}: {result.reason} (run without --strict to skip and report it)")
            warn(f"skipping {result.file}: {result.reason}")
        results.append(result)
        bar.update(1)
    return results


def _write_shard(out: Path, parts: Path, split: str, index: int, shard, results, fingerprint) -> dict:
    name = f"{split}-{index:06d}.tar"
    good = [r for r in results if isinstance(r, Encoded)]
    # Straight into the temporary file (a shard of real frames is ~1 GB: never held in memory), renamed when done.
    sample_ranges = []  # [key, offset, size] of each sample's members: readers fetch exactly these bytes
    with atomic.atomic_path(out / name) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for enc in good:
                start = tar.offset
                for member, data in enc.members:
                    tar.addfile(_tarinfo(member, len(data)), io.BytesIO(data))
                sample_ranges.append([enc.key, start, tar.offset - start])
        size, digest = tmp.stat().st_size, _sha256_file(tmp)  # read back from the page cache
    pixels = sum((r.class_pixels for r in good), np.zeros(NUM_CLASSES, np.int64))
    record = {
        "url": name, "num_samples": len(good), "bytes": size, "sha256": digest,
        "class_pixels": pixels.tolist(), "ignore_pixels": sum(r.ignore_pixels for r in good),
        "skipped": [asdict(r) for r in results if isinstance(r, Orphan)],
        "keys": [s.key for s in shard], "fingerprint": fingerprint, "samples": sample_ranges,
        "inputs": _inputs_digest(shard),
        "conditions": sorted({s.group for s in shard if s.group}),
        "classes": [class_presence(r.class_pixels) for r in good],
        "colour": [r.colour for r in good],
    }
    # The part record is written after the shard: a record always describes a complete shard.
    atomic.write_json(parts / f"{split}-{index:06d}.json", record)
    return record


CLASS_PRESENCE_MIN_SHARE = 3000 / (1914 * 1052)
"""A frame "holds" a class (the bits of each shard's `classes`, what rare-class sampling draws frames by) when the
class covers at least this share of its pixels: DAFormer's rcs_min_pixels, 3,000 pixels of a full-size 1914x1052
GTA5 label (0.15%). Shards written before this kept 0.3%; `segda shards` writes them anew."""


def class_presence(class_pixels: np.ndarray) -> int:
    """Bit c set when class c covers at least CLASS_PRESENCE_MIN_SHARE of the frame's labelled pixels."""
    pixels = np.asarray(class_pixels, np.int64)
    present = pixels >= max(1.0, CLASS_PRESENCE_MIN_SHARE * pixels.sum())
    return int(sum(1 << c for c in np.flatnonzero(present)))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info_ = tarfile.TarInfo(name)
    info_.size, info_.mtime, info_.mode = size, _TAR_MTIME, 0o644
    info_.uid = info_.gid = 0
    info_.uname = info_.gname = ""
    return info_


def _reusable(out: Path, parts: Path, split: str, index: int, shard, fingerprint) -> dict | None:
    """The record of a shard finished by an earlier (interrupted) run with the same inputs, else None."""
    part, tar = parts / f"{split}-{index:06d}.json", out / f"{split}-{index:06d}.tar"
    if not (part.is_file() and tar.is_file()):
        return None
    try:
        record = json.loads(part.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("keys") != [s.key for s in shard]:
        return None
    if "samples" not in record or "classes" not in record:  # written before manifests carried these
        return None
    if record.get("inputs") != _inputs_digest(shard):  # a raw file was edited, replaced or removed since
        return None
    if record.get("sha256") != _sha256_file(tar):
        return None
    return record


def _inputs_digest(shard: list[RawSample]) -> str:
    """What a finished shard was built from: each raw file's path, size and modification time. A re-run reuses
    the shard only if these are unchanged, so an edited frame is never served from an old shard."""
    digest = hashlib.sha256()
    for sample in shard:
        for path in (p for p in (sample.image, sample.label) if p is not None):
            try:
                st = os.stat(path)
                digest.update(f"{sample.rel(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{sample.rel(path)}\0missing\n".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(encode: EncodeOptions, opts: CreateOptions) -> str:
    blob = json.dumps([asdict(encode), opts.shard_size, segda.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _report_orphans(orphans: list[Orphan], strict: bool) -> None:
    for orphan in orphans:
        if strict:
            raise SegdaError(f"{orphan.file}: {orphan.reason} (run without --strict to skip and report it)")
        warn(f"skipping {orphan.file}: {orphan.reason}")


def _manifest(dataset, root, encode: EncodeOptions, opts: CreateOptions, records, orphans) -> dict:
    skipped = [asdict(o) for o in orphans] + [s for r in records for s in r["skipped"]]
    class_pixels = np.sum([r["class_pixels"] for r in records], axis=0).astype(np.int64).tolist()
    return {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "split": encode.split,
        "num_samples": sum(r["num_samples"] for r in records),
        "num_shards": len(records),
        "shards": [{k: r[k] for k in ("url", "num_samples", "bytes", "sha256", "samples", "classes") if k in r}
                   for r in records],
        "class_presence_min_share": CLASS_PRESENCE_MIN_SHARE,
        "labeled": dataset in LABELED,
        "class_names": list(CLASS_NAMES),
        "class_pixels": class_pixels,
        "ignore_pixels": int(sum(r["ignore_pixels"] for r in records)),
        "colour_stats": summarise([c for r in records for c in r.get("colour", [])]),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "options": {**asdict(encode), "shard_size": opts.shard_size, "split_file": opts.split_file,
                    "source_root": str(Path(root).resolve()),
                    **({"conditions": list(opts.conditions)} if opts.conditions else {})},
        **({"conditions": sorted({r_c for r in records for r_c in r.get("conditions", [])})}
           if dataset == "acdc" else {}),
        "segda_version": segda.__version__,
    }


def _summary(manifest: dict, out: Path, seconds: float) -> None:
    n, skipped = manifest["num_samples"], manifest["num_skipped"]
    rate = n / seconds if seconds > 0 else float("inf")
    info(f"wrote {n} samples in {manifest['num_shards']} shard(s) to {out} ({rate:.1f} samples/s); "
         f"skipped {skipped}" + (" (listed in the manifest)" if skipped else ""))
    info(f"manifest: {manifest_path(out, manifest['split'])}")


def index_manifest(path: str | Path) -> dict:
    """Add per-sample byte ranges to a manifest written by segda < 0.2, reading only the tar headers of its local
    shards (seconds, where re-creating the shards re-encodes every label). Rewrites the manifest atomically."""
    from segda.data.shardfiles import index_tar

    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SegdaError(f"cannot read the manifest {path} ({err}); give a *-manifest.json written by `segda shards`")
    from segda.data.datasets import manifest_shard

    for n, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        shard = manifest_shard(str(path), n, {k: v for k, v in entry.items() if k != "samples"}
                               if isinstance(entry, dict) else entry)
        tar = Path(shard.url)
        if not tar.is_file():
            raise SegdaError(f"{tar} (listed in {path}) is not a local file: index the manifest where its shards "
                             "are on disk, then upload it")
        try:
            with open(tar, "rb") as fh:
                samples = index_tar(fh)
        except (OSError, tarfile.TarError) as err:
            raise SegdaError(f"{tar} holds 0 samples readable as a tar ({err}), {path} says "
                             f"{entry['num_samples']}: re-create the shards") from err
        if len(samples) != entry["num_samples"] or tar.stat().st_size != entry.get("bytes", tar.stat().st_size):
            raise SegdaError(f"{tar} holds {len(samples)} samples in {tar.stat().st_size} bytes, {path} says "
                             f"{entry['num_samples']} in {entry.get('bytes')}: re-create the shards")
        entry["samples"] = samples
    manifest["format"] = MANIFEST_FORMAT
    atomic.write_json(path, manifest)
    info(f"indexed {sum(e['num_samples'] for e in entries)} samples in {len(entries)} shard(s): {path}")
    return manifest


def index_to(spec: str, out: str | Path, *, timeout: float = 30.0, retries: int = 5) -> dict:
    """An indexed manifest at `out` for any dataset `spec` (a manifest or a shard pattern, local, http(s) or s3):
    each shard is read once from start to end, for its sample offsets, its size and its sha256. Shard URLs are
    written in full, so the new manifest can live anywhere."""
    from segda.data.datasets import resolve_dataset
    from segda.data.shardfiles import HashingReader, index_tar
    from segda.data.sources import open_url, url_scheme

    ds = resolve_dataset(spec)
    entries = []
    for shard in ds.shards:
        try:
            with open_url(shard.url, timeout=timeout, retries=retries) as stream:
                hashing = HashingReader(stream)
                samples = index_tar(hashing, streaming=True)
                while hashing.read(1 << 20):  # the tar's end padding still counts in its size and hash
                    pass
        except (OSError, tarfile.TarError, EOFError) as err:
            raise SegdaError(f"cannot index {shard.url} ({type(err).__name__}: {err}): a corrupt shard? re-create "
                             "it") from err
        if shard.num_samples is not None and shard.num_samples != len(samples):
            raise SegdaError(f"{shard.url} holds {len(samples)} samples, {spec} says {shard.num_samples}: re-create "
                             "the shards")
        url = shard.url if url_scheme(shard.url) else str(Path(shard.url).resolve())
        entries.append({"url": url, "num_samples": len(samples), "bytes": hashing.size,
                        "sha256": hashing.digest.hexdigest(), "samples": samples})
    manifest = {**(ds.manifest or {}), "format": MANIFEST_FORMAT, "shards": entries,
                "num_samples": sum(e["num_samples"] for e in entries), "num_shards": len(entries)}
    atomic.write_json(out, manifest)
    info(f"indexed {manifest['num_samples']} samples in {len(entries)} shard(s) of {spec}: {out}")
    return manifest
