"""The dataset commands of the `segda` command line: `synth` (synthetic datasets in the real raw layouts),
`shards` (a raw dataset to WebDataset shards and a manifest) and `index` (sample offsets for an old manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from segda.argtypes import int_in as _int_in
from segda.argtypes import size as _size
from segda.log import SegdaError


def add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in a real dataset's raw layout")
    p.add_argument("dataset", choices=["gta5", "cityscapes", "synthia", "acdc", "folder"])
    p.add_argument("out", help="folder to write the raw dataset into")
    p.add_argument("--num", type=_int_in(1), default=40, help="number of frames (default 40)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 320x176 gta5, 320x160 cityscapes)")
    p.add_argument("--seed", type=_int_in(0, 2 ** 31 - 1), default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="cityscapes, acdc: split folder")
    p.add_argument("--condition", default="fog,night,rain,snow", help="acdc: comma-separated conditions")
    p.add_argument("--no-quirks", action="store_true", help="gta5: no frames with image/label size mismatch")
    p.add_argument("--gap", type=_gap, default=None,
                   help="cityscapes: domain gap to synthetic GTA5, 0 (the game's look) to 1 (each material's own "
                        "colour change, a camera's dull colours, noise, blur, another camera and traffic); "
                        "default 0.75 (README, 'The synthetic gap')")
    p.set_defaults(run=_run_synth)


def _gap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--gap {text}: give a number from 0 (no gap) to 1 (the full shift)")
    return value


def _run_synth(args) -> int:
    from segda.shards import synth

    conditions = tuple(c.strip() for c in args.condition.split(",") if c.strip())
    folders = {"gta5": ["images", "labels"], "folder": ["images", "labels"],
               "cityscapes": [f"leftImg8bit/{args.split}", f"gtFine/{args.split}"], "synthia": ["RGB", "GT/LABELS"],
               "acdc": [f"rgb_anon/{c}/{args.split}" for c in conditions]}[args.dataset]
    for target in (Path(args.out) / f for f in folders):
        if target.is_dir() and any(target.iterdir()):  # a mistyped path must not replace a real dataset's frames
            raise SegdaError(f"{target} already holds frames: synth writes only into a new or empty folder; "
                             "choose another output folder or delete this one first")

    if args.gap is not None and args.dataset != "cityscapes":
        raise SegdaError(f"--gap sets synthetic Cityscapes' distance from synthetic GTA5; {args.dataset} has none")
    kwargs = {"size": args.size} if args.size else {}
    if args.dataset == "gta5":
        n = synth.synth_gta5(args.out, args.num, seed=args.seed, quirks=not args.no_quirks, progress=True, **kwargs)
    elif args.dataset == "cityscapes":
        gap = {} if args.gap is None else {"gap": args.gap}
        n = synth.synth_cityscapes(args.out, args.split, args.num, seed=args.seed, progress=True, **kwargs, **gap)
    elif args.dataset == "synthia":
        n = synth.synth_synthia(args.out, args.num, seed=args.seed, progress=True, **kwargs)
    elif args.dataset == "acdc":
        from segda.classes import ACDC_CONDITIONS

        if not conditions or set(conditions) - set(ACDC_CONDITIONS):
            raise SegdaError(f"--condition {args.condition}: choose from {', '.join(ACDC_CONDITIONS)}")
        n = synth.synth_acdc(args.out, args.split, args.num, seed=args.seed, conditions=conditions, progress=True,
                             **kwargs)
    else:
        n = synth.synth_folder(args.out, args.num, seed=args.seed, progress=True, **kwargs)
    print(f"wrote {n} synthetic {args.dataset} frames to {args.out}")
    return 0


def add_shards(sub) -> None:
    from segda.shards.encode import IMAGE_FORMATS

    from segda.shards.layouts import DATASETS

    p = sub.add_parser("shards", help="create WebDataset shards + manifest from a raw dataset folder")
    p.add_argument("dataset", choices=DATASETS, help="gta5, cityscapes, synthia, acdc, folder (images + labels + "
                   "an id map) or images (no labels)")
    p.add_argument("root", help="the raw dataset folder")
    p.add_argument("out", nargs="?", default=None, help="output folder (default shards/<dataset>)")
    p.add_argument("--split", default="train",
                   help="cityscapes, acdc: train|val|test folder; gta5: which ids of --split-file; others: the "
                        "shard names")
    p.add_argument("--split-file", default=None, help="gta5: the official split.mat or a text file of frame ids")
    p.add_argument("--condition", default=None, help="acdc: comma-separated conditions (fog,night,rain,snow; "
                   "default every one present)")
    p.add_argument("--images", default="images", help="folder: the images' folder under ROOT (default images)")
    p.add_argument("--labels", default="labels", help="folder: the labels' folder under ROOT (default labels)")
    p.add_argument("--id-map", default=None, help="folder: YAML mapping label values to train ids (see README)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--workers", type=_int_in(1), default=1, help="encoder processes (default 1)")
    p.add_argument("--resize", type=_size, default=None, help="store frames at WIDTHxHEIGHT (e.g. 1280x720)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="pxz",
                   help="pxz (default: lossless, ~PNG's size, ~6x faster to decode), keep (the original bytes), "
                        "png or bmp (lossless), jpg or webp (lossy)")
    p.add_argument("--quality", type=_int_in(1, 100), default=90, help="jpg/webp quality, 1-100 (default 90)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.set_defaults(run=_run_shards)


def add_index(sub) -> None:
    p = sub.add_parser("index", help="add per-sample byte offsets to a manifest written by segda < 0.2")
    p.add_argument("spec", help="a local *-manifest.json whose shards sit beside it (rewritten in place); with "
                   "--out, any manifest or shard pattern, local, http(s):// or s3://")
    p.add_argument("--out", default=None, help="write the indexed manifest here (reads every shard once)")
    p.set_defaults(run=_run_index)


def _run_index(args) -> int:
    from segda.shards.writer import index_manifest, index_to

    if args.out:
        index_to(args.spec, args.out)
    else:
        index_manifest(args.spec)
    return 0


def _run_shards(args) -> int:
    from segda.shards.encode import EncodeOptions
    from segda.shards.writer import CreateOptions, create_shards

    out = args.out or f"shards/{args.dataset}"
    from segda.shards.encode import load_id_map

    if args.id_map and args.dataset != "folder":
        raise SegdaError("--id-map is for folder datasets (`segda shards folder ROOT --id-map ids.yaml`)")
    id_map = load_id_map(args.id_map) if args.id_map else None
    conditions = tuple(c.strip() for c in args.condition.split(",") if c.strip()) if args.condition else None
    encode = EncodeOptions(args.dataset, args.split, args.resize, args.image_format, args.quality, id_map)
    opts = CreateOptions(args.shard_size, args.workers, args.strict, args.split_file, conditions, args.images,
                         args.labels)
    create_shards(args.dataset, args.root, out, encode, opts)
    return 0
