"""Readers of the raw dataset layouts: find (image, label) pairs and the ones that lack a partner.

GTA5:        ROOT/images/00001.png + ROOT/labels/00001.png (palette PNG of Cityscapes label ids);
             optional split: the official split.mat (trainIds/valIds/testIds) or a text file of ids.
Cityscapes:  ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png +
             ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segda.log import SegdaError

DATASETS = ("gta5", "cityscapes")


@dataclass(frozen=True)
class RawSample:
    key: str
    """Unique, stable sample key inside the shards (no dots: webdataset splits member names at the first dot)."""
    image: Path
    label: Path
    root: Path

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Orphan:
    """A file whose partner is missing: reported and counted, never silently dropped."""
    file: str
    reason: str


def find_samples(dataset: str, root: str | Path, split: str, split_file: str | Path | None = None
                 ) -> tuple[list[RawSample], list[Orphan]]:
    """Return the complete pairs sorted by key, and the orphans, of one split of a raw dataset."""
    root = Path(root)
    if not root.is_dir():
        raise SegdaError(f"dataset root {root} does not exist or is not a folder")
    if dataset == "gta5":
        return _gta5(root, split, split_file)
    if dataset == "cityscapes":
        if split_file is not None:
            raise SegdaError("--split-file is for GTA5 only; Cityscapes splits are its folders (--split train|val|test)")
        return _cityscapes(root, split)
    raise SegdaError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _gta5(root: Path, split: str, split_file) -> tuple[list[RawSample], list[Orphan]]:
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise SegdaError(
            f"{root} is not a GTA5 folder: expected {images_dir}/00001.png and {labels_dir}/00001.png "
            "(the layout of the GTA5 release, or `segda synth gta5 ROOT`)")
    images = {p.stem: p for p in images_dir.glob("*.png")}
    labels = {p.stem: p for p in labels_dir.glob("*.png")}
    if not images and not labels:
        raise SegdaError(f"{images_dir} and {labels_dir} hold no .png files: is {root} the GTA5 root?")
    wanted = _gta5_split_ids(split_file, split) if split_file is not None else None
    if wanted is not None:
        images = {k: v for k, v in images.items() if _as_int(k) in wanted}
        labels = {k: v for k, v in labels.items() if _as_int(k) in wanted}
        missing = sorted(wanted - {_as_int(k) for k in images} - {_as_int(k) for k in labels})
        orphans = [Orphan(f"images/{i:05d}.png", f"listed in {split_file} but neither image nor label exists")
                   for i in missing]
    else:
        orphans = []
    return _pair(root, images, labels, orphans)


def _as_int(stem: str) -> int | None:
    return int(stem) if stem.isdigit() else None


def _gta5_split_ids(split_file, split: str) -> set[int]:
    path = Path(split_file)
    if not path.is_file():
        raise SegdaError(f"split file {path} does not exist (give the GTA5 split.mat or a text file of frame ids)")
    if path.suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError as err:
            raise SegdaError(f"reading {path} needs scipy (pip install scipy), or pass a text file of ids") from err
        mat = loadmat(path)
        field = f"{split}Ids"
        if field not in mat:
            found = [k for k in mat if not k.startswith("__")]
            raise SegdaError(f"{path} has no {field!r} (it has {found}); choose --split train|val|test")
        return {int(v) for v in mat[field].ravel()}
    ids = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        token = line.strip().split(".")[0]
        if not token or token.startswith("#"):
            continue
        if not token.isdigit():
            raise SegdaError(f"{path}:{n}: {line.strip()!r} is not a frame id (expected e.g. 00001 or 1)")
        ids.add(int(token))
    return ids


def _cityscapes(root: Path, split: str) -> tuple[list[RawSample], list[Orphan]]:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_dir.is_dir() and not label_dir.is_dir():
        raise SegdaError(
            f"{root} has no Cityscapes split {split!r}: expected {image_dir}/<city>/<name>_leftImg8bit.png and "
            f"{label_dir}/<city>/<name>_gtFine_labelIds.png (the leftImg8bit + gtFine packages, "
            "or `segda synth cityscapes ROOT --split ...`)")
    images = {p.name[: -len("_leftImg8bit.png")]: p for p in image_dir.glob("*/*_leftImg8bit.png")}
    labels = {p.name[: -len("_gtFine_labelIds.png")]: p for p in label_dir.glob("*/*_gtFine_labelIds.png")}
    if not images and not labels:
        raise SegdaError(f"{image_dir} and {label_dir} hold no Cityscapes frames")
    return _pair(root, images, labels, [])


def _pair(root: Path, images: dict, labels: dict, orphans: list[Orphan]) -> tuple[list[RawSample], list[Orphan]]:
    for key in sorted(images.keys() - labels.keys()):
        orphans.append(Orphan(images[key].relative_to(root).as_posix(), "image without a label"))
    for key in sorted(labels.keys() - images.keys()):
        orphans.append(Orphan(labels[key].relative_to(root).as_posix(), "label without an image"))
    pairs = [RawSample(key, images[key], labels[key], root) for key in sorted(images.keys() & labels.keys())]
    return pairs, orphans
