"""Readers of the raw dataset layouts: find (image, label) pairs and the ones that lack a partner.

GTA5:        ROOT/images/00001.png + ROOT/labels/00001.png (palette PNG of Cityscapes label ids);
             optional split: the official split.mat (trainIds/valIds/testIds) or a text file of ids.
Cityscapes:  ROOT/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png +
             ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png
SYNTHIA:     ROOT/RGB/0000000.png + ROOT/GT/LABELS/0000000.png (SYNTHIA-RAND-CITYSCAPES; 16-bit, class id in R)
ACDC:        ROOT/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png +
             ROOT/gt/<condition>/<split>/<sequence>/<name>_gt_labelTrainIds.png (keys: <condition>_<name>)
folder:      ROOT/<images>/**/NAME.{png,jpg,...} + ROOT/<labels>/**/NAME.png, label values mapped by an id map
images:      every image under ROOT, without labels (unlabeled target data)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segda.log import SegdaError

DATASETS = ("gta5", "cityscapes", "synthia", "acdc", "folder", "images")
LABELED = ("gta5", "cityscapes", "synthia", "acdc", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class RawSample:
    key: str
    """Unique, stable sample key inside the shards (no dots: webdataset splits member names at the first dot)."""
    image: Path
    label: Path | None
    """None for image-only datasets."""
    root: Path
    group: str | None = None
    """ACDC: the weather condition (fog, night, rain, snow), for per-condition reports."""

    def rel(self, path: Path | None) -> str | None:
        return None if path is None else path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Orphan:
    """A file whose partner is missing: reported and counted, never silently dropped."""
    file: str
    reason: str


def find_samples(dataset: str, root: str | Path, split: str, split_file: str | Path | None = None, *,
                 conditions: tuple[str, ...] | None = None, images: str = "images", labels: str = "labels"
                 ) -> tuple[list[RawSample], list[Orphan]]:
    """Return the complete pairs sorted by key, and the orphans, of one split of a raw dataset."""
    root = Path(root)
    if not root.is_dir():
        raise SegdaError(f"dataset root {root} does not exist or is not a folder")
    if split_file is not None and dataset != "gta5":
        raise SegdaError(f"--split-file is for GTA5 only; {dataset} splits are its folders (--split)")
    if conditions is not None and dataset != "acdc":
        raise SegdaError("--condition is for ACDC only")
    if dataset == "gta5":
        return _gta5(root, split, split_file)
    if dataset == "cityscapes":
        return _cityscapes(root, split)
    if dataset == "synthia":
        return _synthia(root)
    if dataset == "acdc":
        return _acdc(root, split, conditions)
    if dataset == "folder":
        return _folder(root, images, labels)
    if dataset == "images":
        return _images(root)
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


def _synthia(root: Path) -> tuple[list[RawSample], list[Orphan]]:
    image_dir, label_dir = root / "RGB", root / "GT" / "LABELS"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise SegdaError(f"{root} is not a SYNTHIA-RAND-CITYSCAPES folder: expected {image_dir}/0000000.png and "
                         f"{label_dir}/0000000.png (the RAND_CITYSCAPES release, or `segda synth synthia ROOT`)")
    images = {p.stem: p for p in image_dir.glob("*.png")}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    if not images and not labels:
        raise SegdaError(f"{image_dir} and {label_dir} hold no .png files: is {root} the SYNTHIA root?")
    return _pair(root, images, labels, [])


def _acdc(root: Path, split: str, conditions) -> tuple[list[RawSample], list[Orphan]]:
    from segda.classes import ACDC_CONDITIONS

    unknown = sorted(set(conditions or ()) - set(ACDC_CONDITIONS))
    if unknown:
        raise SegdaError(f"--condition {','.join(unknown)}: ACDC's conditions are {', '.join(ACDC_CONDITIONS)}")
    if not (root / "rgb_anon").is_dir():
        raise SegdaError(f"{root} is not an ACDC folder: expected {root}/rgb_anon/<condition>/{split}/<sequence>/"
                         f"<name>_rgb_anon.png and {root}/gt/<condition>/{split}/<sequence>/"
                         "<name>_gt_labelTrainIds.png (the rgb_anon + gt packages, or `segda synth acdc ROOT`)")
    pairs, orphans = [], []
    for condition in conditions or ACDC_CONDITIONS:
        image_dir, label_dir = root / "rgb_anon" / condition / split, root / "gt" / condition / split
        if conditions is None and not image_dir.is_dir() and not label_dir.is_dir():
            continue  # not every condition has to be downloaded
        images = {f"{condition}_{p.name[:-len('_rgb_anon.png')]}": p
                  for p in image_dir.glob("*/*_rgb_anon.png")}
        labels = {f"{condition}_{p.name[:-len('_gt_labelTrainIds.png')]}": p
                  for p in label_dir.glob("*/*_gt_labelTrainIds.png")}
        if not images and not labels:
            raise SegdaError(f"{image_dir} holds no ACDC frames of split {split!r}")
        found, lost = _pair(root, images, labels, [], group=condition)
        pairs += found
        orphans += lost
    if not pairs and not orphans:
        raise SegdaError(f"{root}/rgb_anon has no condition with split {split!r}")
    return sorted(pairs, key=lambda s: s.key), orphans


def _key_of(relative: Path) -> str:
    """A file's path under its folder as a sample key: no dots (webdataset splits names at the first one)."""
    return "_".join(relative.with_suffix("").parts).replace(".", "_")


def _files(folder: Path, suffixes) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in suffixes and not path.name.startswith("."):
            key = _key_of(path.relative_to(folder))
            if key in found:
                raise SegdaError(f"{found[key]} and {path} would get the same sample key {key!r}: rename one")
            found[key] = path
    return found


def _folder(root: Path, images: str, labels: str) -> tuple[list[RawSample], list[Orphan]]:
    image_dir, label_dir = root / images, root / labels
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise SegdaError(f"{root} has no {image_dir.name}/ and {label_dir.name}/ folders: a folder dataset is "
                         f"ROOT/{images}/NAME.png (or .jpg ...) with ROOT/{labels}/NAME.png; name them with --images "
                         "and --labels")
    found_images, found_labels = _files(image_dir, IMAGE_SUFFIXES), _files(label_dir, (".png",))
    if not found_images and not found_labels:
        raise SegdaError(f"{image_dir} and {label_dir} hold no images")
    return _pair(root, found_images, found_labels, [])


def _images(root: Path) -> tuple[list[RawSample], list[Orphan]]:
    found = _files(root, IMAGE_SUFFIXES)
    if not found:
        raise SegdaError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    # The file name is the key when it is unique (a Cityscapes leftImg8bit tree: its frame names), else the path.
    stems = [_key_of(Path(path.name)).removesuffix("_leftImg8bit").removesuffix("_rgb_anon")
             for path in found.values()]
    keys = stems if len(set(stems)) == len(stems) else list(found)
    return sorted((RawSample(key, path, None, root) for key, path in zip(keys, found.values())),
                  key=lambda s: s.key), []


def _pair(root: Path, images: dict, labels: dict, orphans: list[Orphan], group: str | None = None
          ) -> tuple[list[RawSample], list[Orphan]]:
    for key in sorted(images.keys() - labels.keys()):
        orphans.append(Orphan(images[key].relative_to(root).as_posix(), "image without a label"))
    for key in sorted(labels.keys() - images.keys()):
        orphans.append(Orphan(labels[key].relative_to(root).as_posix(), "label without an image"))
    pairs = [RawSample(key, images[key], labels[key], root, group) for key in sorted(images.keys() & labels.keys())]
    return pairs, orphans
