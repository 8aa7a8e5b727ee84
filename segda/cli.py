"""The `segda` command line: the only module that reads sys.argv. Each sub-command calls one library function.

    segda synth gta5 raw/gta5 --num 40 --size 320x176
    segda shards gta5 raw/gta5 shards/gta5 --workers 2
    accelerate launch -m segda pretrain configs/pretrain_gta5.yaml --out runs/gta5
    segda evaluate --model source=runs/gta5/model --data cs-val=shards/cityscapes/val-manifest.json --out report/
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import sys
from pathlib import Path

from segda.argtypes import int_in as _int_in
from segda.argtypes import seconds as _seconds
from segda.argtypes import size as _size
from segda.cli_data import add_index, add_shards, add_synth
from segda.host_memory import keep_freed_memory
from segda.log import SegdaError


def _add_train(sub, stage: str, help_: str) -> None:
    p = sub.add_parser(stage, help=help_)
    p.add_argument("config", help="experiment YAML (configs/...)")
    p.add_argument("--out", required=True, help="run folder (model/ or adapter/, checkpoints/, run.json)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="auto (default when given): newest checkpoint under --out; or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier run: move it aside to OUT.old-DATE (never deleted) and start anew")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set train.seed=1 data.batch_size=4 (repeatable)")
    p.set_defaults(run=_run_train, stage=stage)


def _run_train(args) -> int:
    from segda.config import load_config
    from segda.launchenv import refuse_deepspeed_under_cpu_flag
    from segda.modelfiles import check_model_folder
    from segda.resume import launched_world, refuse_unresumable
    from segda.rundir import check_flags, find_resume, read_checkpoint_state, run_summary

    overrides = list(args.set) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    # Before torch loads: a mistyped key or base folder, a launch that cannot give what its config asks, or a
    # resume that cannot continue its checkpoint is named in a fraction of a second, not after five.
    refuse_deepspeed_under_cpu_flag()
    check_flags(args.resume, args.overwrite)
    cfg = load_config(args.config, overrides)
    finished = args.resume == "auto" and (run_summary(args.out) or {}).get("status") == "done"
    if not finished:  # a finished run needs no base: train() says `nothing to resume` or what else it decides
        check_model_folder(cfg.model.name_or_path)
        found = find_resume(args.out, args.resume)
        if found is not None:  # train() checks again, on the folder it has locked, and says what takes effect
            refuse_unresumable(read_checkpoint_state(found), cfg, args.stage, found, world=launched_world())
    from segda.train import train
    from segda.train.preempt import EXIT_PREEMPTED, Preempted

    try:
        train(args.stage, cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except Preempted as stop:  # a clean stop, not an error: the scheduler requeues on this status
        print(f"segda: preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _add_inference_flags(p) -> None:
    p.add_argument("--mode", choices=["whole", "slide"], default="whole", help="inference mode (default whole)")
    p.add_argument("--eval-size", type=_size, default=(1024, 512), help="whole mode: WIDTHxHEIGHT (default 1024x512)")
    p.add_argument("--crop", type=_size, default=(512, 512), help="slide mode: window WIDTHxHEIGHT (default 512)")
    p.add_argument("--stride", type=_size, default=(341, 341), help="slide mode: window step WIDTHxHEIGHT (default 341)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation")
    p.add_argument("--batch-size", type=_int_in(1), default=4, help="frames (whole) or windows (slide) per forward")
    p.add_argument("--max-pixels", type=_int_in(1), default=8192 * 4096,
                   help="refuse frames larger than this many pixels (default 8192x4096: their logits take 2.5 GB)")
    p.add_argument("--base", default=None, help="base model for adapters (default: the one the adapter records)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply an adapter to a base whose fingerprint differs from the one it was trained on")


def _inference_options(args):
    from segda.evaluate import InferenceOptions

    return InferenceOptions(mode=args.mode, eval_size=args.eval_size, crop=args.crop,
                            stride=args.stride, flip=args.flip, batch_size=args.batch_size, max_pixels=args.max_pixels)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="mIoU of every model x dataset pair, with a report")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="a model folder or an adapter folder (repeatable)")
    p.add_argument("--data", action="append", required=True, metavar="[LABEL=]SPEC",
                   help="a manifest or shard URL pattern: local, http(s)://, s3:// (repeatable)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N samples per dataset (0: all)")
    p.add_argument("--classes", choices=["19", "synthia16", "synthia13"], default="19",
                   help="evaluation protocol: the classes the mIoU averages (SYNTHIA -> Cityscapes: synthia16, "
                        "synthia13)")
    p.add_argument("--workers", type=_int_in(0), default=2, help="loader workers per process")
    p.add_argument("--examples", type=int, default=4, help="example predictions per pair in the report")
    p.add_argument("--verify", action="store_true", help="check shard sha256 against the manifest")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run shell commands)")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds a remote read may wait (data.timeout)")
    p.add_argument("--retries", type=_int_in(1), default=5, help="attempts per remote read (data.retries)")
    p.add_argument("--colour-match", default=None, metavar="SPEC",
                   help="match each frame's colours (Reinhard, YCbCr) to SPEC's before inference: a manifest (its "
                        "colour_stats, else its frames are read) or a JSON {ycc_mean, ycc_std}; a no-training "
                        "baseline for domain adaptation")
    _add_inference_flags(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from segda.config import DataConfig
    from segda.evaluate import evaluate_matrix, parse_labeled

    if args.limit < 0 or args.workers < 0 or args.examples < 0:
        raise SegdaError("--limit, --workers and --examples must be >= 0")
    data_cfg = DataConfig(workers=args.workers, verify=args.verify, allow_pipe=args.allow_pipe,
                          eval_size="{}x{}".format(*args.eval_size), timeout=args.timeout, retries=args.retries)
    opts = _inference_options(args)
    if args.colour_match:
        import dataclasses

        from segda.colourstats import load_colour_stats

        opts = dataclasses.replace(opts, colour_match=load_colour_stats(args.colour_match, data_cfg))
    evaluate_matrix(parse_labeled(args.model, "model"), parse_labeled(args.data, "data"), args.out, data_cfg,
                    opts, base=args.base, allow_base_mismatch=args.allow_base_mismatch,
                    limit=args.limit, num_examples=args.examples, protocol=args.classes)
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="train-id masks and coloured overlays for images")
    p.add_argument("model", help="a model folder or an adapter folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["train-ids", "cityscapes"], default="train-ids",
                   help="train-ids: masks + overlays (default); cityscapes: label-id PNGs named for the official "
                        "evaluator (cityscapesScripts)")
    _add_inference_flags(p)
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from segda.predict import predict_files

    predict_files(args.model, args.images, args.out, _inference_options(args), base=args.base,
                  allow_base_mismatch=args.allow_base_mismatch, fmt=args.format)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base and save a plain transformers model")
    p.add_argument("adapter", help="adapter folder (RUN_DIR/adapter)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--base", default=None, help="base model (default: the one the adapter records)")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from segda.predict import export_merged

    export_merged(args.adapter, args.out, base=args.base, allow_base_mismatch=args.allow_base_mismatch)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole study on synthetic data: synth, shards, pretrain, adapt, evaluate")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--processes", type=_int_in(1, 64), default=1, help="CPU processes for the training stages (DDP)")
    p.add_argument("--oracle", action="store_true", help="also train on the target domain directly ('target')")
    p.add_argument("--seed", type=_int_in(0, 2 ** 31 - 1), default=0)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage (numbers meaningless)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier study: move it aside to OUT.old-DATE (never deleted) and start anew")
    p.add_argument("--summarize", nargs="+", metavar="DIR", default=None,
                   help="train nothing: print the studies in these folders (one per seed) as one table, mean ± "
                        "standard error, with the per-class changes self-training and its pseudo-labels bring")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from segda.demo import SMOKE, DemoSize, run_demo

    if args.summarize:
        from segda.demo_summary import load_reports, summarize

        print(summarize(load_reports(args.summarize)))
        return 0
    run_demo(args.out, args.processes, args.oracle, args.seed, SMOKE if args.smoke else DemoSize(),
             overwrite=args.overwrite)
    return 0


def _add_bench(sub) -> None:
    from segda.bench.cli import add_parser

    add_parser(sub, _size, _int_in)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segda", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [
    add_synth,
    add_shards,
    add_index,
    lambda sub: _add_train(sub, "pretrain", "train the whole SegFormer on source shards (accelerate launch -m segda)"),
    lambda sub: _add_train(sub, "adapt", "train a LoRA adapter on target shards, saving only the adapter"),
    _add_evaluate,
    _add_predict,
    _add_export,
    _add_demo,
    _add_bench,
]


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `segda` command itself, not a library or test caller
        _skip_the_last_collections_at_exit()
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # before torch is loaded: then glibc reuses big freed blocks (segda.host_memory)
    try:
        _check_out(args)
        return args.run(args) or 0
    except SegdaError as err:
        print(f"segda: error: {_user_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the one place a file-system failure becomes a line naming the file
        where = err.filename or getattr(args, "out", None) or "the output"
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            print(f"segda: error: cannot write {where}: {err.strerror}; free some space or choose another --out "
                  "(what was complete before is kept; nothing half-written was left under a final name)",
                  file=sys.stderr)
        elif err.filename is not None:
            print(f"segda: error: {where}: {err.strerror}; check the path (a folder where a file is expected, "
                  "or the reverse, a dangling link, missing permissions)", file=sys.stderr)
        else:
            raise
        return 2
    except KeyboardInterrupt:
        print("segda: interrupted", file=sys.stderr)
        return 130


def _skip_the_last_collections_at_exit() -> None:
    """At exit the interpreter's last garbage collections walk every object torch and transformers made at import:
    1.1 s at the end of every `segda` process, each rank of a launch included (`python -c 'import segda.train'`,
    timed from its last atexit handler to its exit), 0.2 s with them frozen first. Exit handlers still all run
    (flushes, loader workers joined); freezing skips only the collection of reference cycles during teardown, whose
    finalizers Python never promises to run at exit."""
    atexit.register(gc.freeze)


def _check_out(args) -> None:
    """Every command's output folder: an existing file there is a mistyped path, never something to replace."""
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise SegdaError(f"the output {out} is an existing file, not a folder: give a folder for the output")


def _user_message(err: SegdaError) -> str:
    """A SegdaError raised in a DataLoader worker comes back wrapped in the worker's traceback, with the message
    last; keep only the message (it names the file or URL)."""
    text = str(err)
    if "Original Traceback" in text and "SegdaError: " in text:
        return text.rsplit("SegdaError: ", 1)[1].strip()
    return text


if __name__ == "__main__":
    raise SystemExit(main())
