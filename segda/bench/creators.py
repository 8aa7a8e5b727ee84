"""`segda bench codec` (PXZ against PNG: bytes and decode time) and `segda bench shards` (segda's creator against
`tar` of the raw files)."""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from segda.bench import report
from segda.log import info


def bench_codec(images: list[str], repeats: int = 7) -> dict:
    """PXZ (segda's default shard codec) against the images' own PNG bytes: size and single-core decode time."""
    import cv2

    from segda import codec
    from segda.data.transforms import decode_image

    cv2.setNumThreads(1)
    rows, pxz_ms, png_ms, pxz_bytes, png_bytes = [], [], [], 0, 0
    for path in images:
        original = Path(path).read_bytes()
        rgb = decode_image(original)
        png = original if original[:8] == b"\x89PNG\r\n\x1a\n" else \
            cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        pxz = codec.encode(rgb)
        assert np.array_equal(codec.decode(pxz), rgb), f"{path}: PXZ did not round-trip"
        times = {}
        for name, data in (("png", png), ("pxz", pxz)):
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                decode_image(data)
                runs.append(1000 * (time.perf_counter() - start))
            times[name] = statistics.median(runs)
        pxz_ms.append(times["pxz"])
        png_ms.append(times["png"])
        pxz_bytes, png_bytes = pxz_bytes + len(pxz), png_bytes + len(png)
        rows.append(f"| {Path(path).name} | {rgb.shape[1]}x{rgb.shape[0]} | {len(png) / 1e6:.2f} MB | "
                    f"{len(pxz) / 1e6:.2f} MB ({len(pxz) / len(png):.2f}x) | {times['png']:.1f} | {times['pxz']:.1f} |")
    print("| image | size | PNG | PXZ (vs PNG) | PNG decode ms | PXZ decode ms |\n|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"bytes: PXZ / PNG = {pxz_bytes / png_bytes:.2f}x")
    info(f"codec: {len(images)} image(s), median of {repeats} single-threaded decodes each (to RGB)")
    return {"size_ratio": pxz_bytes / png_bytes, **report("decode", [1000 / t for t in pxz_ms],
                                                             [1000 / t for t in png_ms], "frames/s")}


def bench_shards(dataset: str, raw: str, split: str = "train", workers: int = 1, repeats: int = 3) -> dict:
    """segda's creator (validate, LUT-remap labels, copy image bytes, hash) against `tar` of the raw files."""
    from segda.shards.encode import EncodeOptions
    from segda.shards.layouts import find_samples
    from segda.shards.writer import CreateOptions, create_shards

    pairs, _ = find_samples(dataset, raw, split)
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.txt"
        listing.write_text("".join(f"{p.rel(p.image)}\n{p.rel(p.label)}\n" for p in pairs))
        for r in range(repeats):
            start = time.perf_counter()
            create_shards(dataset, raw, Path(tmp) / f"segda-{r}", EncodeOptions(dataset, split),
                          CreateOptions(shard_size=256, workers=workers), progress=False)
            ours.append(len(pairs) / (time.perf_counter() - start))
            start = time.perf_counter()
            # The limit: copying bytes into a tar. Fixed argv, no shell.
            subprocess.run(["tar", "-cf", str(Path(tmp) / f"plain-{r}.tar"), "-C", str(raw), "-T", str(listing)],
                           check=True)
            base.append(len(pairs) / (time.perf_counter() - start))
    info(f"creators: {len(pairs)} {dataset} frames, {workers} worker(s); baseline: tar of the raw files")
    return report("creators", ours, base, "samples/s")
