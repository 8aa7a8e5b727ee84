"""Typed experiment configs: dataclasses with a default and a docstring per field, loaded from YAML.

    cfg = load_config("configs/pretrain_gta5.yaml", overrides=["train.max_steps=100", "data.batch_size=4"])

Only science lives here (data, model, optimisation, LoRA). Hardware (processes, mixed precision, DeepSpeed) lives
in the Accelerate launch YAML under `launch/`. Unknown keys and bad values raise a SegdaError that names the key
and says what is allowed; `reference_markdown()` renders every field for the README so the docs cannot drift.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

from segda import configfile
from segda.compat import drop_retired, is_retired, old_size_list, size_list_fix
from segda.configfile import check
from segda.log import SegdaError


class Size(str):
    """A size written WIDTHxHEIGHT, as every size in segda is (configs, CLI, reports): "1024x512".

    `.wh` and `.hw` give the numbers in the order an API wants them; nothing else should split the text.
    """

    MAX = 1 << 16
    """Neither side may exceed this: no image segda reads or writes is larger."""

    @property
    def wh(self) -> tuple[int, int]:
        w, h = self.split("x")
        return int(w), int(h)

    @property
    def hw(self) -> tuple[int, int]:
        return self.wh[::-1]

    @classmethod
    def parse(cls, value, what: str) -> "Size":
        """"WxH" (or a whole number N for NxN) -> Size; anything else raises a SegdaError saying how to write it."""
        return parse_size(value, what)


def parse_size(value, what: str) -> Size:
    """"WxH" (or a whole number N for NxN) -> Size; anything else raises a SegdaError saying how to write it."""
    text = "" if isinstance(value, bool) or not isinstance(value, (str, int)) else str(value).strip().lower()
    if text.isascii() and text.isdigit():
        text = f"{text}x{text}"
    parts = text.replace(" ", "").split("x")
    if len(parts) == 2 and all(p.isascii() and p.isdigit() and 1 <= int(p) <= Size.MAX for p in parts):
        return Size(f"{int(parts[0])}x{int(parts[1])}")
    name = what.rsplit(".", 1)[-1]
    migrated = old_size_list(name, value)
    if migrated is not None:  # segda < 0.3 (segda.compat)
        raise SegdaError(f"{what}: sizes are written WIDTHxHEIGHT now, like every size in segda: "
                         f"{size_list_fix(name, value, what, migrated)}")
    raise SegdaError(f"{what}: {value!r} is not a size; write WIDTHxHEIGHT with sides from 1 to {Size.MAX}, e.g. "
                     "1024x512 (or N for NxN)")


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
    timeout: float = 30.0
    """Seconds a remote read may wait on a silent server before that attempt fails (then it is retried)."""
    retries: int = 5
    """Attempts per remote read before giving up (exponential backoff, each retry announced on stderr)."""
    io_threads: int = 4
    """Sample reads in flight per loader worker (indexed datasets): hides the round trip of each Range request."""
    threads: str = "auto"
    """CPU threads of the training process and its loader workers. auto: the cores shared out so that no core runs
    two busy threads (segda.data.loader.thread_budget; OMP_NUM_THREADS, if set, still rules the training process);
    library: OpenMP and OpenCV start one thread per core in every process, as they do by themselves."""
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
    target_base_size: Size | None = None
    """`adapt.method: selftrain`: WIDTHxHEIGHT the target's random rescale is relative to, when it differs from
    `base_size` (DAFormer: 1280x720 for GTA5, 1024x512 for Cityscapes); empty: `base_size`."""

    def __post_init__(self):  # built in code (benchmarks, the CLI) as well as from YAML: one form of size
        for name in ("crop_size", "base_size", "eval_size"):
            setattr(self, name, parse_size(getattr(self, name), f"data.{name}"))
        if self.target_base_size:
            self.target_base_size = parse_size(self.target_base_size, "data.target_base_size")
        else:
            self.target_base_size = None

    def check(self) -> None:
        check(self.batch_size >= 1, "data.batch_size", "must be at least 1")
        check(self.workers >= 0, "data.workers", "must be 0 (load in the main process) or more")
        check(min(self.crop_size.wh) >= 8, "data.crop_size", "must be at least 8x8")
        check(min(self.base_size.wh) >= 8, "data.base_size", "must be at least 8x8")
        check(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1] <= 16,
              "data.scale_range", "must be [low, high] with 0 < low <= high <= 16")
        check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", "must be in (0, 1]")
        check(min(self.eval_size.wh) >= 8, "data.eval_size", "must be at least 8x8")
        check(self.io_threads >= 1, "data.io_threads", "must be at least 1")
        check(self.threads in ("auto", "library"), "data.threads", f"must be auto or library (got {self.threads!r})")
        check(0 < self.timeout <= 3600, "data.timeout", "must be a positive number of seconds (at most 3600)")
        check(self.retries >= 1, "data.retries", "must be at least 1")
        check(self.crops_per_frame >= 1 and self.batch_size % self.crops_per_frame == 0, "data.crops_per_frame",
              f"must be >= 1 and divide data.batch_size ({self.batch_size})")


@dataclass
class ModelConfig:
    name_or_path: str = "nvidia/mit-b0"
    """Hub id or local folder of the model to start from; for `adapt`, the pretrained base model. Empty: random init."""
    config: dict = field(default_factory=dict)
    """SegformerConfig overrides for random init (empty = MiT-b0 shape), e.g. {hidden_sizes: [16, 32, 64, 128]}."""

    def check(self) -> None:
        check(not self.config or not self.name_or_path, "model.config",
              "applies to random init only: clear model.name_or_path, or model.config")


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

    def check(self) -> None:
        check(self.lr > 0, "optim.lr", "must be positive")
        check(self.head_lr_mult > 0, "optim.head_lr_mult", "must be positive")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
              "must be two values in [0, 1)")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.poly_power >= 0, "optim.poly_power", "must be >= 0 (0: constant after warmup)")
        check(self.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 disables clipping)")


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
    compile_mode: str = "default"
    """inductor's mode: default, reduce-overhead (CUDA graphs: removes kernel-launch overhead, the cost of small
    batches on fast GPUs), max-autotune or max-autotune-no-cudagraphs (slower to compile; measure first)."""
    channels_last: bool = False
    """Feed the model channels-last tensors (can help convolutions on GPUs with tensor cores: measure first)."""
    seed: int = 0
    """Seed of model init (same on every rank), data order and augmentation (per sample key); dropout adds the rank."""

    def check(self) -> None:
        check(self.max_steps >= 1, "train.max_steps", "must be at least 1")
        check(self.grad_accum >= 1, "train.grad_accum", "must be at least 1")
        check(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0 (0 disables it)")
        check(self.on_world_change in ("keep_global_batch", "keep_per_rank_batch"), "train.on_world_change",
              "must be keep_global_batch or keep_per_rank_batch")
        for key in ("checkpoint_every", "eval_every", "eval_max_samples"):
            check(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0 disables)")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
        check(self.log_every >= 1, "train.log_every", "must be at least 1")
        check(0 <= self.seed < 2 ** 31, "train.seed", "must be a whole number from 0 to 2**31 - 1")
        check(self.compile_mode in COMPILE_MODES, "train.compile_mode",
              f"must be one of {', '.join(COMPILE_MODES)} (got {self.compile_mode!r})")


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
    """Encoder layers that get LoRA (transformers 5 names: q_proj, k_proj, v_proj, o_proj, fc1, fc2; and
    patch_embeddings.proj, the convolution that starts each stage; stage 0's sees the frame's colours)."""
    head: str = "classifier+norm"
    """What trains in the decode head: none | classifier | classifier+norm | lora | full."""

    def check(self) -> None:
        check(self.r >= 1, "lora.r", "must be at least 1")
        check(self.alpha > 0, "lora.alpha", "must be positive")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(self.head in HEAD_MODES, "lora.head", f"must be one of {', '.join(HEAD_MODES)} (got {self.head!r})")
        check(bool(self.target_modules) or self.head != "none", "lora.target_modules",
              "is empty and lora.head is none: nothing would train; name encoder layers (q_proj, fc1, ...)")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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
    """selftrain: a pseudo-label is confident when the teacher's top probability reaches this (DAFormer)."""
    pseudo_weight: str = "batch"
    """selftrain: how a pseudo-label counts. batch: every target pixel weighs the batch's share of confident
    pixels (DAFormer, one number per batch); image: its image's share; pixel: 1 if the teacher is confident of it,
    else 0 (FixMatch)."""
    pseudo_loss_weight: float = 1.0
    """selftrain: multiplies the pseudo-labelled pixels' weight in the mixed loss (the pasted source pixels keep
    weight 1); 0 learns from the mixed frames' source pixels alone, a baseline (the teacher then never runs)."""
    pseudo_ignore_top: int = 15
    """selftrain: the first rows of each target crop are never pseudo-labelled (DAFormer's 15 for 512x512 crops
    of Cityscapes); padding never is either."""
    pseudo_ignore_bottom: int = 120
    """selftrain: neither are the last rows of each target crop (DAFormer's 120: Cityscapes' car hood)."""
    teacher_norm_stats: str = "batch"
    """selftrain: the statistics the teacher's BatchNorm uses on target crops. batch: the target batch's own (DAFormer,
    whose teacher stays in train mode); running: the student's running statistics (source-like)."""
    student_forward: str = "separate"
    """selftrain: separate: the source and the mixed batch go through the student in two forwards, so BatchNorm
    sees each domain's statistics (DAFormer); joint: one forward of both (one batch of 2B)."""
    rare_class_temperature: float = 0.01
    """selftrain: rare-class sampling of source frames, P(c) ~ exp((1 - f_c) / T) (DAFormer: 0.01); 0 disables."""
    colour_transfer: bool = False
    """selftrain: each labelled source crop takes the colour statistics (mean and spread of luma and chroma, the
    spread scaled 0.25-4x at most) of the target crop it is mixed into, before both losses (Reinhard et al.'s
    transfer; no label is read): the source loss then teaches the target's colours. Off in DAFormer and in both
    recipes: the demo's `source+colour` row measures what colour alone gives."""
    save: str = "student"
    """selftrain: which adapter RUN_DIR/adapter holds, student or teacher (the EMA); the other goes to
    RUN_DIR/adapter-<other>. The two were within 0.6 points in every demo run measured, the student ahead in all
    but one."""

    def check(self, data: DataConfig) -> None:
        check(self.method in ADAPT_METHODS, "adapt.method",
              f"must be one of {', '.join(ADAPT_METHODS)} (got {self.method!r})")
        check(self.method != "selftrain" or bool(data.target), "data.target",
              "must name the target's frames (a manifest or shard pattern) when adapt.method is selftrain")
        for key in ("target", "target_base_size"):
            check(self.method == "selftrain" or not getattr(data, key), f"data.{key}",
                  "is read only by adapt.method=selftrain: set adapt.method=selftrain, or leave it empty")
        check(0 < self.ema_alpha < 1, "adapt.ema_alpha", "must be in (0, 1)")
        check(0 < self.pseudo_threshold <= 1, "adapt.pseudo_threshold", "must be in (0, 1]")
        check(self.rare_class_temperature >= 0, "adapt.rare_class_temperature", "must be >= 0 (0 disables it)")
        check(self.save in ("teacher", "student"), "adapt.save", f"must be teacher or student (got {self.save!r})")
        check(self.pseudo_weight in ("batch", "image", "pixel"), "adapt.pseudo_weight",
              f"must be batch, image or pixel (got {self.pseudo_weight!r})")
        check(self.pseudo_loss_weight >= 0, "adapt.pseudo_loss_weight", "must be >= 0 (0: no pseudo-label loss)")
        check(self.teacher_norm_stats in ("batch", "running"), "adapt.teacher_norm_stats",
              f"must be batch or running (got {self.teacher_norm_stats!r})")
        check(self.student_forward in ("separate", "joint"), "adapt.student_forward",
              f"must be separate or joint (got {self.student_forward!r})")
        rows = data.crop_size.hw[0]
        check(self.method != "selftrain" or self.pseudo_ignore_top >= 0 and self.pseudo_ignore_bottom >= 0 and
              self.pseudo_ignore_top + self.pseudo_ignore_bottom < rows, "adapt.pseudo_ignore_top",
              f"and adapt.pseudo_ignore_bottom must be >= 0 and leave rows of the {rows}-row crop (data.crop_size) to "
              f"pseudo-label (got {self.pseudo_ignore_top} and {self.pseudo_ignore_bottom}); DAFormer's 15 and 120 "
              "are for 512-row crops")


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

    def check(self) -> None:
        """Validate every section (each checks its own keys); SegdaError naming the first bad key."""
        for section in (self.data, self.model, self.optim, self.train, self.lora):
            section.check()
        self.adapt.check(self.data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (or the defaults), apply `a.b=c` overrides, validate, and return the Config."""
    raw: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise SegdaError(f"config file {path} does not exist (see configs/ for recipes)")
        raw = configfile.read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise SegdaError(f"{path} must hold a mapping of sections (data:, model:, ...)")
    cfg = configfile.build(Config, drop_retired(raw, str(path)), prefix="", source=str(path or "defaults"))
    for item in overrides:
        if not is_retired(item.split("=", 1)[0].strip()):
            configfile.apply_override(cfg, item)
    cfg.check()
    return cfg


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


def _type_name(hint) -> str:
    return configfile.type_name(hint)


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
