"""Colour statistics of frames in YCbCr (luma and two colour-difference axes, 0-1 colours): what test-time colour
matching (`segda evaluate --colour-match`) and colour transfer in self-training (adapt.colour_transfer) match.

    stats = frame_stats(rgb)                    # one frame: [mean Y, Cb, Cr, spread Y, Cb, Cr]
    manifest["colour_stats"] = summarise(list_of_frame_stats)   # the creator records the dataset's mean
    mean, std = load_colour_stats("shards/gta5/train-manifest.json", data_cfg)
"""

from __future__ import annotations

import json

import numpy as np

from segda.log import SegdaError, info

TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
"""RGB (0-1) -> BT.601 YCbCr without offsets: brightness, contrast and saturation are each one channel's mean or
spread there, so per-channel statistics carry a camera's look."""
STEP = 4
"""Frame statistics read every 4th pixel in each direction: 16x cheaper, the same numbers to 3 decimals."""


def frame_stats(rgb: np.ndarray) -> list[float]:
    """(H, W, 3) uint8 RGB -> [mean of Y, Cb, Cr, then their standard deviations] over the frame."""
    sample = rgb[::STEP, ::STEP, :3].reshape(-1, 3).astype(np.float32) / 255
    ycc = sample @ TO_YCC.T.astype(np.float32)
    return [*map(float, ycc.mean(axis=0)), *map(float, ycc.std(axis=0))]


def summarise(stats: list[list[float]]) -> dict:
    """The mean over frames of each frame's statistics: the look a Reinhard transfer matches a frame to."""
    values = np.asarray(stats, np.float64).reshape(-1, 6)
    if not len(values):
        return {}
    mean = values.mean(axis=0)
    return {"ycc_mean": mean[:3].round(6).tolist(), "ycc_std": mean[3:].round(6).tolist(), "frames": len(values)}


def load_colour_stats(spec: str, data_cfg) -> tuple[list[float], list[float]]:
    """(YCbCr mean, spread) from a statistics JSON ({"ycc_mean", "ycc_std"}), a manifest that records them
    ("colour_stats", written by `segda shards`), or any dataset, whose frames are then read once."""
    from segda.data.datasets import resolve_dataset

    if spec.endswith(".json"):
        from segda.data.sources import read_bytes

        try:
            found = json.loads(read_bytes(spec, allow_pipe=data_cfg.allow_pipe, timeout=data_cfg.timeout,
                                          retries=data_cfg.retries))
        except ValueError as err:
            raise SegdaError(f"--colour-match {spec}: not JSON ({err})") from err
        stats = found.get("colour_stats", found) if isinstance(found, dict) else {}
        if _valid(stats):
            return stats["ycc_mean"], stats["ycc_std"]
        if not (isinstance(found, dict) and "shards" in found):
            raise SegdaError(f"--colour-match {spec}: expected {{\"ycc_mean\": [3 numbers], \"ycc_std\": [3 numbers]}} "
                             "or a manifest")
    ds = resolve_dataset(spec, allow_pipe=data_cfg.allow_pipe, timeout=data_cfg.timeout, retries=data_cfg.retries)
    info(f"--colour-match: reading the frames of {spec} for their colour statistics (manifests written by "
         "`segda shards` record them)")
    from segda.data.eval_stream import eval_loader

    stats = [frame_stats(image.numpy()) for batch in eval_loader(ds, data_cfg, rank=0, world=1, batch_size=8)
             for image in batch["image"]]
    summary = summarise(stats)
    if not _valid(summary):
        raise SegdaError(f"--colour-match {spec}: no frame could be read")
    return summary["ycc_mean"], summary["ycc_std"]


def _valid(stats) -> bool:
    return isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == 3 and all(isinstance(v, (int, float)) for v in stats[k])
        for k in ("ycc_mean", "ycc_std"))
