"""Decode a raw sample and cut augmented training crops from it, seeded by (seed, epoch, key): the same crops
whichever rank or worker reads the sample, so a resumed run sees the batches an uninterrupted one would have.

    augmenter = Augmenter(cfg.data, seed, labeled=True, bad=reader.bad)
    crops = augmenter.crops(sample, epoch)      # [(key, image uint8 (h, w, 3), label uint8 (h, w), valid (3,))]
"""

from __future__ import annotations

import zlib

import numpy as np

from segda.config import DataConfig
from segda.data import transforms as T
from segda.data.bad import BadSamples
from segda.data.reader import IMAGE_EXTS, LABEL_EXT


def decode_sample(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image, label); an image-only sample (unlabeled shards) gets a label of IGNORE everywhere."""
    ext = next(e for e in IMAGE_EXTS if e in sample)
    image = T.decode_image(sample[ext])
    if LABEL_EXT not in sample:
        return image, np.full(image.shape[:2], T.IGNORE, np.uint8)
    return image, T.decode_label(sample[LABEL_EXT])


class Augmenter:
    """Decode a raw sample once and cut `crops_per_frame` augmented crops from it. Each crop comes with `valid`:
    (rows, first column, end column) of its part that holds the frame, the rest being padding (a frame rescaled
    below the crop size)."""

    def __init__(self, cfg: DataConfig, seed: int, labeled: bool = True, bad: BadSamples | None = None):
        self.cfg, self.seed, self.bad = cfg, seed, bad if bad is not None else BadSamples(cfg.strict)
        self.cat_max_ratio = cfg.cat_max_ratio if labeled else 1.0  # no classes to balance without labels

    def crops(self, sample: dict, epoch: int, draw: tuple[int, int] | None = None) -> list[tuple] | None:
        """`draw`: (position in the epoch's order, class) of a rare-class draw: the crop must hold that class, and
        a frame drawn twice in an epoch gets two different crops. None for a sample that cannot be decoded."""
        key = sample["__key__"]
        try:
            image, label = decode_sample(sample)
        except T.DecodeError as err:
            self.bad.report(f"sample {key} in {sample['__url__']}: {err}; skipped")
            return None
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode()), *(draw[:1] if draw else ())])
        want = draw[1] if draw else None
        return [(key, *self._augment(image, label, rng, want)) for _ in range(self.cfg.crops_per_frame)]

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, want: int | None = None):
        cfg = self.cfg
        image, label, valid = T.random_scale_crop(image, label, rng, cfg.base_size.wh, cfg.scale_range,
                                                  cfg.crop_size.wh, self.cat_max_ratio, want)
        rows, cols = valid
        span = (0, cols)
        if cfg.flip:
            image, label, flipped = T.random_flip(image, label, rng)
            if flipped:  # the padding was right of the frame's columns: after the flip it is on their left
                span = (image.shape[1] - cols, image.shape[1])
        if cfg.photometric:
            image = T.photometric_distortion(image, rng)
        return image, label, np.asarray((rows, *span), np.int32)
