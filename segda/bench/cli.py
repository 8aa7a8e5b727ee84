"""The `segda bench` sub-commands: their arguments and which benchmark each runs."""

from __future__ import annotations


def add_parser(sub, _size, _int_in) -> None:
    """`segda bench KIND`: `_size` and `_int_in` are the CLI's argument types."""
    p = sub.add_parser("bench", help="throughput of segda against a plain baseline, side by side")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    loader = kinds.add_parser("loader", help="shard stream vs PIL + SegformerImageProcessor on the raw PNGs")
    loader.add_argument("--data", required=True, help="manifest of the shards")
    loader.add_argument("--raw", required=True, help="the raw dataset folder the shards were made from")
    loader.add_argument("--workers", type=_int_in(0), default=1)
    loader.add_argument("--crop", type=_size, default=(512, 512), help="WIDTHxHEIGHT (default 512)")
    loader.add_argument("--batch", type=int, default=4)
    loader.add_argument("--samples", type=int, default=64, help="samples per timed run")
    loader.add_argument("--base-size", type=_size, default=None, help="WIDTHxHEIGHT the rescale is relative to")
    loader.add_argument("--repeats", type=int, default=3)
    loader.add_argument("--crops-per-frame", type=int, default=1, help="crops cut from each decoded frame")
    train = kinds.add_parser("train", help="segda's training step vs a plain transformers fp32 loop")
    train.add_argument("--crop", type=_size, default=(256, 256), help="WIDTHxHEIGHT (default 256)")
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--steps", type=int, default=3, help="timed steps per run")
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--device", default=None)
    train.add_argument("--compile", action="store_true", help="also time segda's step under torch.compile")
    train.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                               "max-autotune-no-cudagraphs"],
                       help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs)")
    train.add_argument("--json", default=None, help="also write the figures to this JSON file")
    train.add_argument("--channels-last", action="store_true", help="channels-last model and inputs")
    head = kinds.add_parser("head", help="SegFormer with segda's fused decode head vs transformers' own head")
    head.add_argument("--crop", type=_size, default=(96, 96), help="WIDTHxHEIGHT (default 96)")
    head.add_argument("--batch", type=int, default=8)
    head.add_argument("--config", choices=["demo", "b0"], default="demo",
                      help="demo: segda demo's half-width MiT-b0 (default); b0: MiT-b0")
    head.add_argument("--steps", type=int, default=5, help="timed passes per run")
    head.add_argument("--repeats", type=int, default=3)
    head.add_argument("--device", default=None)
    head.add_argument("--json", default=None, help="also write the figures to this JSON file")
    head.add_argument("--bf16", action="store_true", help="under bf16 autocast, as segda trains on a GPU")
    adapters = kinds.add_parser("adapters", help="evaluating adapters of one base: shared base vs reloading it")
    adapters.add_argument("adapters", nargs="+", help="adapter folders of the same base")
    adapters.add_argument("--data", required=True, help="a manifest to evaluate on")
    adapters.add_argument("--eval-size", type=_size, default=(1024, 512))
    adapters.add_argument("--repeats", type=_int_in(1), default=3)
    codec = kinds.add_parser("codec", help="PXZ, the default shard codec, vs PNG: bytes and decode time per image")
    codec.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...): use frames of your own dataset")
    codec.add_argument("--repeats", type=_int_in(1), default=7)
    shards = kinds.add_parser("shards", help="segda's creator vs tar of the raw files")
    shards.add_argument("dataset", choices=["gta5", "cityscapes"])
    shards.add_argument("raw")
    shards.add_argument("--split", default="train")
    shards.add_argument("--workers", type=_int_in(1), default=1)
    shards.add_argument("--repeats", type=int, default=3)
    stream = kinds.add_parser("stream", help="W ranks x K workers in one process against counting HTTP/S3 servers")
    stream.add_argument("--world", type=int, default=8, help="simulated ranks (default 8)")
    stream.add_argument("--workers", type=_int_in(0), default=8, help="loader workers per rank (default 8)")
    stream.add_argument("--train", type=int, default=2975, help="training frames (default: Cityscapes' 2,975)")
    stream.add_argument("--val", type=int, default=500, help="validation frames (default: Cityscapes' 500)")
    stream.add_argument("--shard-size", type=int, default=256)
    stream.add_argument("--size", type=_size, default=(64, 32), help="frame WIDTHxHEIGHT (default 64x32)")
    stream.add_argument("--batch", type=int, default=8, help="frames per batch per rank (default 8)")
    stream.add_argument("--sources", default="http,s3", help="comma-separated: http, s3 (default both)")
    stream.add_argument("--data-dir", default=None, help="keep the generated shards here and reuse them")
    stream.add_argument("--no-stall", action="store_true", help="skip the real-DataLoader epoch-boundary stall")
    loop = kinds.add_parser("loop", help="the real training loop, phase by phase, beside the loader and the step")
    loop.add_argument("--model", choices=["tiny", "b0"], default="tiny", help="tiny: ~11k weights (default); b0")
    loop.add_argument("--stage", choices=["pretrain", "adapt", "selftrain"], default="pretrain")
    loop.add_argument("--crop", type=_size, default=(512, 512), help="WIDTHxHEIGHT (default 512)")
    loop.add_argument("--batch", type=_int_in(1), default=8)
    loop.add_argument("--workers", type=_int_in(0), default=1, help="loader workers (default 1)")
    loop.add_argument("--steps", type=_int_in(1), default=20, help="timed steps (default 20)")
    loop.add_argument("--warmup", type=_int_in(1), default=5, help="untimed first steps (default 5)")
    loop.add_argument("--frames", type=_int_in(2), default=32, help="synthetic frames to make (default 32)")
    loop.add_argument("--size", type=_size, default=(1280, 720), help="their WIDTHxHEIGHT (default 1280x720)")
    loop.add_argument("--data-dir", default=None, help="keep the generated frames and shards here and reuse them")
    loop.add_argument("--json", default=None, help="also write the figures to this JSON file")
    loop.add_argument("--threads", choices=["auto", "library"], default="auto",
                      help="data.threads: auto (segda's share-out) or library (each library's own defaults)")
    loop.add_argument("--step-rate", type=float, action="append", default=None,
                      help="step rates (samples/s) to size the loader for (default: the measured step, and 218.7, "
                           "MiT-b0's step on one H200)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    if args.kind == "loader":
        from segda.bench.loader import bench_loader

        bench_loader(args.data, args.raw, args.workers, args.crop, args.batch, args.samples, args.repeats,
                     args.base_size, args.crops_per_frame)
    elif args.kind == "adapters":
        from segda.bench.adapters import bench_adapters

        bench_adapters(args.adapters, args.data, args.repeats, args.eval_size)
    elif args.kind == "codec":
        from segda.bench.creators import bench_codec

        bench_codec(args.images, args.repeats)
    elif args.kind == "train":
        from segda.bench.step import bench_train

        result = bench_train(args.crop, args.batch, args.steps, args.repeats, args.device, compile=args.compile,
                             channels_last=args.channels_last,
                             compile_mode=None if args.compile_mode in (None, "default") else args.compile_mode)
        if args.json:
            import json
            from pathlib import Path

            Path(args.json).write_text(json.dumps({"crop": list(args.crop), "batch": args.batch, **result}, indent=2,
                                                  default=float) + "\n")
    elif args.kind == "head":
        from segda.bench.head import bench_head

        result = bench_head(args.crop, args.batch, args.steps, args.repeats, args.config, args.device, args.bf16)
        if args.json:
            import json
            from pathlib import Path

            Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    elif args.kind == "loop":
        from segda.bench.loop import bench_loop

        bench_loop(args.model, args.crop, args.batch, args.workers, args.steps, args.warmup, args.stage, args.frames,
                   args.size, args.data_dir, args.json, tuple(args.step_rate or (218.7,)), args.threads)
    elif args.kind == "stream":
        from segda.bench.stream import bench_stream

        bench_stream(args.world, args.workers, data_dir=args.data_dir, train=args.train, val=args.val,
                     shard_size=args.shard_size, size=args.size, batch=args.batch,
                     sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()), stall=not args.no_stall)
    else:
        from segda.bench.creators import bench_shards

        bench_shards(args.dataset, args.raw, args.split, args.workers, args.repeats)
    return 0
