"""Typed experiment configs: dataclasses with a default and a docstring per field, loaded from YAML.

    cfg = load_config("configs/pretrain_gta5.yaml", overrides=["train.max_steps=100", "data.batch_size=4"])

Only science lives here (data, model, optimisation, LoRA). Hardware (processes, mixed precision, DeepSpeed) lives
in the Accelerate launch YAML under `launch/`. Unknown keys and bad values raise a SegdaError that names the key
and says what is allowed; `reference_markdown()` renders every field for the README so the docs cannot drift.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segda.log import SegdaError


class Size(str):
    """A size written WIDTHxHEIGHT, as every size in segda is (configs, CLI, reports): "1024x512".

    `.wh` and `.hw` give the numbers in the order an API wants them; nothing else should split the text.
    """

    @property
    def wh(self) -> tuple[int, int]:
        w, h = self.split("x")
        return int(w), int(h)

    @property
    def hw(self) -> tuple[int, int]:
        return self.wh[::-1]


# Before segda 0.3 sizes were lists, in two orders: crop_size [height, width] beside base_size and eval_size
# [width, height]. A list is refused with the exact text to write, computed from the order it was written in.
_OLD_LIST_ORDER = {"crop_size": "hw", "base_size": "wh", "eval_size": "wh"}


def parse_size(value, what: str) -> Size:
    """"WxH" (or a whole number N for NxN) -> Size; anything else raises a SegdaError saying how to write it."""
    text = "" if isinstance(value, bool) or not isinstance(value, (str, int)) else str(value).strip().lower()
    if text.isascii() and text.isdigit():
        text = f"{text}x{text}"
    parts = text.replace(" ", "").split("x")
    if len(parts) == 2 and all(p.isascii() and p.isdigit() and int(p) >= 1 for p in parts):
        return Size(f"{int(parts[0])}x{int(parts[1])}")
    name = what.rsplit(".", 1)[-1]
    migrated = old_size_list(name, value)
    if migrated is not None:
        order = "width, height" if _OLD_LIST_ORDER[name] == "wh" else "height, width"
        fix = f"{what}={migrated}" if what.startswith("--set ") else f"{name}: {migrated}"
        raise SegdaError(f"{what}: sizes are written WIDTHxHEIGHT now, like every size in segda: write {fix} (the "
                         f"list {value} was [{order}], the old convention of this key)")
    raise SegdaError(f"{what}: {value!r} is not a size; write WIDTHxHEIGHT, e.g. 1024x512 (or N for NxN)")


def old_size_list(name: str, value) -> str | None:
    """The WIDTHxHEIGHT text of a size list written before segda 0.3 (None if `value` is not one)."""
    if name in _OLD_LIST_ORDER and isinstance(value, list) and len(value) == 2 and \
            all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        w, h = value if _OLD_LIST_ORDER[name] == "wh" else value[::-1]
        return f"{w}x{h}"
    return None


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a manifest (`shards/gta5/train-manifest.json`, http(s)://, s3://) or a shard URL pattern."""
    val: str = ""
    """Validation data for in-run evaluation (same forms as `train`); empty disables it."""
    batch_size: int = 8
    """Samples per batch on each process (data-parallel rank)."""
    workers: int = 4
    """Loader worker processes per rank; shards are split by rank, then by worker."""
    crop_size: Size = Size("512x512")
    """Training crop, WIDTHxHEIGHT; smaller frames are padded (label 255)."""
    base_size: Size = Size("1280x720")
    """WIDTHxHEIGHT the random rescale is relative to (mmseg: 1280x720 for GTA5, 2048x1024 for Cityscapes)."""
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    """Random rescale factor range applied to `base_size` (keeping the frame's aspect ratio)."""
    cat_max_ratio: float = 0.75
    """mmseg's rule: retry a crop (up to 10 times) while one class covers more than this share; 1.0 disables."""
    flip: bool = True
    """Random horizontal flip."""
    photometric: bool = True
    """Random brightness, contrast, saturation and hue (mmseg's PhotoMetricDistortion)."""
    crops_per_frame: int = 1
    """Random crops cut from each decoded frame (decoding a PNG costs ~10 crops); must divide batch_size."""
    shuffle_buffer: int = 64
    """Samples held per worker for shuffling, for datasets read shard by shard (no byte offsets in the manifest);
    indexed datasets are shuffled over the whole dataset and ignore it."""
    timeout: float = 30.0
    """Seconds a remote read may wait on a silent server before that attempt fails (then it is retried)."""
    retries: int = 5
    """Attempts per remote read before giving up (exponential backoff, each retry announced on stderr)."""
    io_threads: int = 4
    """Sample reads in flight per loader worker (indexed datasets): hides the round trip of each Range request."""
    eval_size: Size = Size("1024x512")
    """WIDTHxHEIGHT frames are resized to for whole-image evaluation; logits go back to label size."""
    verify: bool = False
    """Check each shard's sha256 against the manifest before using it."""
    strict: bool = False
    """Raise on a corrupt shard or sample instead of skipping it with a warning."""
    allow_pipe: bool = False
    """Allow `pipe:` URLs, which run shell commands. Only for URLs you trust."""
    target: str = ""
    """`adapt.method: selftrain`: the target domain's training frames (same forms as `train`), labels unused."""
    target_base_size: str = ""
    """`adapt.method: selftrain`: WIDTHxHEIGHT the target's random rescale is relative to, when it differs from
    `base_size` (DAFormer: 1280x720 for GTA5, 1024x512 for Cityscapes); empty: `base_size`."""

    def __post_init__(self):  # built in code (benchmarks, the CLI) as well as from YAML: one form of size
        for name in ("crop_size", "base_size", "eval_size"):
            setattr(self, name, parse_size(getattr(self, name), f"data.{name}"))
        if self.target_base_size:
            self.target_base_size = parse_size(self.target_base_size, "data.target_base_size")


@dataclass
class ModelConfig:
    name_or_path: str = "nvidia/mit-b0"
    """Hub id or local folder of the model to start from; for `adapt`, the pretrained base model. Empty: random init."""
    config: dict = field(default_factory=dict)
    """SegformerConfig overrides for random init (empty = MiT-b0 shape), e.g. {hidden_sizes: [16, 32, 64, 128]}."""


@dataclass
class OptimConfig:
    lr: float = 6e-5
    """Peak learning rate of AdamW (SegFormer recipe)."""
    head_lr_mult: float = 10.0
    """Learning-rate multiplier for the decode head (SegFormer recipe: 10)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to norms, biases or position embeddings."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 1500
    """Linear warmup steps before the poly decay."""
    poly_power: float = 1.0
    """Power of the polynomial decay from the peak to zero at `train.max_steps`."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""


@dataclass
class TrainConfig:
    max_steps: int = 40000
    """Optimizer steps to train for (step-based, as the SegFormer recipe)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is batch_size x processes x grad_accum."""
    checkpoint_every: int = 2000
    """Save a resumable checkpoint every N steps (0: never; the final model or adapter is always saved)."""
    checkpoint_minutes: float = 0.0
    """Also save one when this many minutes have passed since the last (0: off): bounds the work a crash loses."""
    on_world_change: str = "keep_global_batch"
    """Resuming on another number of processes: keep_global_batch (adjust grad_accum to keep batch_size x
    processes x grad_accum; refused if it does not divide) or keep_per_rank_batch (the global batch changes)."""
    log_samples: bool = False
    """Append every trained sample's key to RUN_DIR/samples/rank-R.jsonl (an audit of the data order)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    eval_every: int = 4000
    """Evaluate on `data.val` every N steps (0: only at the end, if `data.val` is set)."""
    eval_max_samples: int = 0
    """Evaluate on at most this many validation samples per evaluation (0: all)."""
    log_every: int = 50
    """Write a metrics line every N steps."""
    compile: bool = False
    """torch.compile the training forward and backward (first steps compile; measure with `segda bench train`)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (fast kernels); aot_eager or eager only check that the model traces."""
    channels_last: bool = False
    """Feed the model channels-last tensors (can help convolutions on GPUs with tensor cores: measure first)."""
    seed: int = 0
    """Seed of model init (same on every rank), data order and augmentation (per sample key); dropout adds the rank."""


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"])
    """Encoder linear layers that get LoRA (transformers 5 names: q_proj, k_proj, v_proj, o_proj, fc1, fc2)."""
    head: str = "classifier+norm"
    """What trains in the decode head: none | classifier | classifier+norm | lora | full."""


HEAD_MODES = ("none", "classifier", "classifier+norm", "lora", "full")


@dataclass
class AdaptConfig:
    method: str = "supervised"
    """supervised: data.train holds labelled target frames. selftrain: no target label is used; data.train is the
    labelled source, data.target the target's frames, and the adapter self-trains against an EMA teacher on
    ClassMix-ed frames (DACS / DAFormer)."""
    ema_alpha: float = 0.999
    """selftrain: the teacher's EMA momentum, warmed up as min(1 - 1/(step + 1), ema_alpha) (DAFormer)."""
    pseudo_threshold: float = 0.968
    """selftrain: a target frame's pseudo-labels weigh its share of pixels the teacher is this sure of (DAFormer)."""
    pseudo_weight: str = "image"
    """selftrain: how a pseudo-label counts. image: each pixel weighs its image's share of confident pixels
    (DAFormer); pixel: a pixel counts (weight 1) only if the teacher is confident of it (FixMatch)."""
    rare_class_temperature: float = 0.01
    """selftrain: rare-class sampling of source frames, P(c) ~ exp((1 - f_c) / T) (DAFormer: 0.01); 0 disables."""
    colour_transfer: bool = False
    """selftrain: each labelled source crop takes the colour statistics (mean and spread of luma and chroma, the
    spread scaled 0.25-4x at most) of the target crop it is mixed into, before both losses (Reinhard et al.'s
    transfer; no label is read): the source loss then teaches the target's colours. Off in DAFormer; the demo
    recipe turns it on (measured in the README)."""
    save: str = "student"
    """selftrain: which adapter RUN_DIR/adapter holds, student or teacher (the EMA); the other goes to
    RUN_DIR/adapter-<other>. The two were within 0.6 points in every demo run measured, the student ahead in all
    but one."""


ADAPT_METHODS = ("supervised", "selftrain")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (or the defaults), apply `a.b=c` overrides, validate, and return the Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SegdaError(f"config file {path} does not exist (see configs/ for recipes)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SegdaError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise SegdaError(f"{path} must hold a mapping of sections (data:, model:, ...)")
    cfg = _build(Config, raw, prefix="", source=str(path or "defaults"))
    for item in overrides:
        _apply_override(cfg, item)
    validate(cfg)
    return cfg


def _build(cls, raw: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise SegdaError(f"{source}: unknown config key {dotted!r}{_suggest(key, names, prefix)}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise SegdaError(f"{source}: {dotted!r} must be a mapping of its fields")
            kwargs[key] = _build(hints[key], value, dotted + ".", source)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return f"{hint} (allowed: {', '.join(prefix + n for n in names)})"


def _coerce(value, hint, dotted: str, source: str):
    if hint is Size:
        return parse_size(value, f"{source}: {dotted}" if source != "--set" else f"--set {dotted}")
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads 6e-5 (no dot) as a string
    if origin is list and isinstance(value, list) and typing.get_args(hint) == (float,):
        value = [_float_or_same(v) if isinstance(v, str) else v for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(origin, True)
    if origin is str and value is None:
        return ""
    if not ok:
        raise SegdaError(f"{source}: {dotted} must be {_type_name(hint)}, got {value!r}")
    if origin is float:
        return float(value)
    if origin is list:
        (item_type,) = typing.get_args(hint) or (object,)
        for item in value:
            if item_type is float and isinstance(item, (int, float)) and not isinstance(item, bool):
                continue
            if item_type is not object and not isinstance(item, item_type):
                raise SegdaError(f"{source}: {dotted} must be {_type_name(hint)}, got {value!r}")
        return [float(v) for v in value] if item_type is float else list(value)
    return value


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _apply_override(cfg: Config, item: str) -> None:
    if "=" not in item:
        raise SegdaError(f"--set {item!r}: expected dotted.key=value, e.g. train.max_steps=1000")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    target = cfg
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(target)]
        prefix = ".".join(parts[:depth]) + ("." if depth else "")
        if part not in names:
            raise SegdaError(f"--set: unknown config key {dotted!r}{_suggest(part, names, prefix)}")
        if depth == len(parts) - 1:
            hint = typing.get_type_hints(type(target))[part]
            if dataclasses.is_dataclass(hint):
                raise SegdaError(f"--set: {dotted!r} is a section; set one of its fields, e.g. {dotted}.<field>=...")
            value = _parse_value(text, hint)
            setattr(target, part, _coerce(value, hint, dotted, "--set"))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise SegdaError(f"--set: {'.'.join(parts[:depth + 1])!r} is not a section")


def _parse_value(text: str, hint):
    if hint is str:
        return text
    if hint is Size and not text.strip().startswith("["):  # YAML would read 0x10 as 16, 1:30 as 90
        return text  # a path like 007 or true stays a string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def validate(cfg: Config) -> None:
    d, t, o, lo = cfg.data, cfg.train, cfg.optim, cfg.lora
    _check(d.batch_size >= 1, "data.batch_size", "must be at least 1")
    _check(d.workers >= 0, "data.workers", "must be 0 (load in the main process) or more")
    _check(min(d.crop_size.wh) >= 8, "data.crop_size", "must be at least 8x8")
    _check(min(d.base_size.wh) >= 8, "data.base_size", "must be at least 8x8")
    _check(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range",
           "must be [low, high] with 0 < low <= high")
    _check(0 < d.cat_max_ratio <= 1, "data.cat_max_ratio", "must be in (0, 1]")
    _check(min(d.eval_size.wh) >= 8, "data.eval_size", "must be at least 8x8")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1")
    _check(d.io_threads >= 1, "data.io_threads", "must be at least 1")
    _check(d.timeout > 0, "data.timeout", "must be a positive number of seconds")
    _check(d.retries >= 1, "data.retries", "must be at least 1")
    _check(d.crops_per_frame >= 1 and d.batch_size % d.crops_per_frame == 0, "data.crops_per_frame",
           f"must be >= 1 and divide data.batch_size ({d.batch_size})")
    _check(o.lr > 0, "optim.lr", "must be positive")
    _check(o.head_lr_mult > 0, "optim.head_lr_mult", "must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 disables clipping)")
    _check(t.max_steps >= 1, "train.max_steps", "must be at least 1")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    _check(t.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0 (0 disables it)")
    _check(t.on_world_change in ("keep_global_batch", "keep_per_rank_batch"), "train.on_world_change",
           "must be keep_global_batch or keep_per_rank_batch")
    for key in ("checkpoint_every", "eval_every", "eval_max_samples"):
        _check(getattr(t, key) >= 0, f"train.{key}", "must be >= 0 (0 disables)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    _check(t.log_every >= 1, "train.log_every", "must be at least 1")
    _check(lo.r >= 1, "lora.r", "must be at least 1")
    _check(lo.alpha > 0, "lora.alpha", "must be positive")
    _check(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
    _check(lo.head in HEAD_MODES, "lora.head", f"must be one of {', '.join(HEAD_MODES)} (got {lo.head!r})")
    if d.target_base_size:  # a str field (empty allowed): --set and YAML values become a Size here
        d.target_base_size = parse_size(str(d.target_base_size), "data.target_base_size")
    a = cfg.adapt
    _check(a.method in ADAPT_METHODS, "adapt.method", f"must be one of {', '.join(ADAPT_METHODS)} (got {a.method!r})")
    _check(a.method != "selftrain" or bool(d.target), "data.target",
           "must name the target's frames (a manifest or shard pattern) when adapt.method is selftrain")
    for key in ("target", "target_base_size"):
        _check(a.method == "selftrain" or not getattr(d, key), f"data.{key}",
               "is read only by adapt.method=selftrain: set adapt.method=selftrain, or leave it empty")
    _check(0 < a.ema_alpha < 1, "adapt.ema_alpha", "must be in (0, 1)")
    _check(0 < a.pseudo_threshold <= 1, "adapt.pseudo_threshold", "must be in (0, 1]")
    _check(a.rare_class_temperature >= 0, "adapt.rare_class_temperature", "must be >= 0 (0 disables it)")
    _check(a.save in ("teacher", "student"), "adapt.save", f"must be teacher or student (got {a.save!r})")
    _check(a.pseudo_weight in ("image", "pixel"), "adapt.pseudo_weight", f"must be image or pixel (got {a.pseudo_weight!r})")


def _check(ok: bool, key: str, rule: str) -> None:
    if not ok:
        raise SegdaError(f"config key {key} {rule}")


def reference_markdown() -> str:
    """Every config field as Markdown tables: the README's configuration reference is generated from this."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"### `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            hint = _type_name(typing.get_type_hints(cls)[f.name])
            lines.append(f"| `{section.name}.{f.name}` | {hint} | `{default!r}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """Read the docstring under each field from the class source (dataclasses keep no field docs)."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    docs, last = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            docs[last] = " ".join(str(node.value.value).split())
            last = None
    return docs


if __name__ == "__main__":  # python -m segda.config > the README's configuration reference
    print(reference_markdown())
