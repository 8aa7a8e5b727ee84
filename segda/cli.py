"""The `segda` command line: the only module that reads sys.argv. Each sub-command calls one library function.

    segda synth gta5 raw/gta5 --num 40 --size 320x176
    segda shards gta5 raw/gta5 shards/gta5 --workers 2
    accelerate launch -m segda pretrain configs/pretrain_gta5.yaml --out runs/gta5
    segda evaluate --model source=runs/gta5/model --data cs-val=shards/cityscapes/val-manifest.json --out report/
"""

from __future__ import annotations

import argparse
import sys

from segda.log import SegdaError


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 1 or h < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write WIDTHxHEIGHT, e.g. 1280x720") from None
    return w, h


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in GTA5's or Cityscapes' raw layout")
    p.add_argument("dataset", choices=["gta5", "cityscapes"])
    p.add_argument("out", help="folder to write the raw dataset into")
    p.add_argument("--num", type=int, default=40, help="number of frames (default 40)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default 320x176 gta5, 320x160 cityscapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="cityscapes split folder")
    p.add_argument("--no-quirks", action="store_true", help="gta5: no frames with image/label size mismatch")
    p.set_defaults(run=_run_synth)


def _run_synth(args) -> int:
    from segda.shards.synth import synth_cityscapes, synth_gta5

    kwargs = {"size": args.size} if args.size else {}
    if args.dataset == "gta5":
        n = synth_gta5(args.out, args.num, seed=args.seed, quirks=not args.no_quirks, progress=True, **kwargs)
    else:
        n = synth_cityscapes(args.out, args.split, args.num, seed=args.seed, progress=True, **kwargs)
    print(f"wrote {n} synthetic {args.dataset} frames to {args.out}")
    return 0


def _add_shards(sub) -> None:
    from segda.shards.encode import IMAGE_FORMATS

    p = sub.add_parser("shards", help="create WebDataset shards + manifest from a raw GTA5 or Cityscapes folder")
    p.add_argument("dataset", choices=["gta5", "cityscapes"])
    p.add_argument("root", help="the raw dataset folder")
    p.add_argument("out", nargs="?", default=None, help="output folder (default shards/<dataset>)")
    p.add_argument("--split", default="train",
                   help="cityscapes: train|val|test folder; gta5: which ids of --split-file (and the shard names)")
    p.add_argument("--split-file", default=None, help="gta5: the official split.mat or a text file of frame ids")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--workers", type=int, default=1, help="encoder processes (default 1)")
    p.add_argument("--resize", type=_size, default=None, help="store frames at WIDTHxHEIGHT (e.g. 1280x720)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="keep",
                   help="keep the original bytes (default), or re-encode as png (lossless), jpg or webp (lossy)")
    p.add_argument("--quality", type=int, default=90, help="jpg/webp quality (default 90)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    p.set_defaults(run=_run_shards)


def _run_shards(args) -> int:
    from segda.shards.encode import EncodeOptions
    from segda.shards.writer import CreateOptions, create_shards

    out = args.out or f"shards/{args.dataset}"
    encode = EncodeOptions(args.dataset, args.split, args.resize, args.image_format, args.quality)
    opts = CreateOptions(args.shard_size, args.workers, args.strict, args.split_file)
    create_shards(args.dataset, args.root, out, encode, opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segda", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_synth, _add_shards]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except SegdaError as err:
        print(f"segda: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segda: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
