"""LoRA adapters with peft: attach, save only the adapter (safetensors), load with checks, merge.

An adapter folder holds `adapter_model.safetensors` + `adapter_config.json` (plain peft can load it:
`PeftModel.from_pretrained(SegformerForSemanticSegmentation.from_pretrained(BASE), ADAPTER)`), a `segda.json`
with the base model's fingerprint, the class list and the training config, and a short model-card README.

The decode head has BatchNorm: when the head adapts, its BatchNorm is saved with the adapter (running statistics
included), otherwise it is kept in eval mode while training so its statistics cannot drift unsaved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from segda import atomic
from segda.classes import CLASS_NAMES, NUM_CLASSES
from segda.config import LoraConfig
from safetensors import SafetensorError

from segda.log import SegdaError, warn
from segda.model import build_model, fingerprint

METADATA = "segda.json"
WEIGHTS = "adapter_model.safetensors"

_HEAD_SAVED = {
    "none": [],
    "classifier": ["classifier"],
    "classifier+norm": ["classifier", "batch_norm"],
    "lora": ["batch_norm"],
    "full": ["decode_head"],
}
_HEAD_LORA = r"decode_head\.(linear_fuse|classifier|linear_projections\.\d+\.proj)"
_SEGFORMER_NAMES = ("transformers 5 SegFormer names are q_proj, k_proj, v_proj, o_proj, fc1, fc2, "
                    "patch_embeddings.proj")
"""What an error about lora.target_modules lists: the layers a target can name."""


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    encoder = "|".join(cfg.target_modules)
    # A regex anchored in the encoder, so encoder targets never hit same-named layers in the head (the head's
    # linear_projections.N.proj beside the encoder's patch_embeddings.proj); head LoRA is opt-in.
    targets = rf"segformer\..*\.({encoder})" + (rf"|{_HEAD_LORA}" if cfg.head == "lora" else "")
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          modules_to_save=_HEAD_SAVED[cfg.head] or None, bias="none")


def attach_lora(model, cfg: LoraConfig) -> PeftModel:
    """Freeze `model`, add LoRA to the configured layers, and unfreeze the configured head parts."""
    try:
        peft_model = get_peft_model(model, peft_config(cfg))
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise SegdaError(f"lora.target_modules {cfg.target_modules} (lora.head {cfg.head}) match no layer of the model "
                         f"({err}); {_SEGFORMER_NAMES}") from None
    matched = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    if not matched:
        raise SegdaError(f"lora.target_modules {cfg.target_modules} match no layer of the model; {_SEGFORMER_NAMES}")
    return peft_model


def freeze_untrained_norms(model) -> None:
    """BatchNorm layers that are not trained stay in eval mode: their running stats must not drift unsaved."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def save_adapter(model: PeftModel, out_dir: str | Path, *, base: str, base_fingerprint: str, config: dict,
                 metrics: dict | None = None) -> Path:
    """Write the adapter folder atomically; only the adapter tensors go in (never the frozen base)."""
    model = getattr(model, "module", model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {"base_model": base, "base_fingerprint": base_fingerprint, "num_classes": NUM_CLASSES,
            "class_names": list(CLASS_NAMES), "trainable_parameters": trainable, "config": config,
            "metrics": metrics or {}}
    with atomic.atomic_path(out_dir) as tmp, atomic.os_errors(out_dir):
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(meta, tmp))
    return Path(out_dir)


def _model_card(meta: dict, folder: Path) -> str:
    size = (folder / WEIGHTS).stat().st_size
    lines = ["---", "library_name: peft", f"base_model: {meta['base_model']}", "tags: [segda, segformer, lora, "
             "semantic-segmentation]", "---", "", "# segda LoRA adapter", "",
             f"- base model: `{meta['base_model']}` (fingerprint `{meta['base_fingerprint'][:16]}`)",
             f"- trainable parameters: {meta['trainable_parameters']:,}", f"- adapter file: {size / 1e6:.2f} MB",
             f"- classes: {meta['num_classes']} (Cityscapes train ids)", ""]
    if meta["metrics"]:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in meta["metrics"].items()]
        lines.append("")
    lines += ["## Load", "", "```python", "from peft import PeftModel",
              "from transformers import SegformerForSemanticSegmentation",
              f"base = SegformerForSemanticSegmentation.from_pretrained({meta['base_model']!r})",
              "model = PeftModel.from_pretrained(base, ADAPTER_DIR)", "```", ""]
    return "\n".join(lines)


def read_metadata(adapter_dir: str | Path, base: str | None = None) -> dict:
    """segda's metadata of an adapter; a plain peft adapter (no segda.json) is accepted when `base` is given."""
    path = Path(adapter_dir) / METADATA
    if not (Path(adapter_dir) / WEIGHTS).is_file():
        raise SegdaError(f"{adapter_dir} is not a safetensors adapter folder: {WEIGHTS} is missing "
                         "(segda never loads pickled .bin weights)")
    if not path.is_file():
        if base:
            warn(f"{adapter_dir} has no {METADATA} (not written by `segda adapt`): its base cannot be checked")
            return {}
        raise SegdaError(f"{path} is missing: was {adapter_dir} written by `segda adapt`? Pass --base BASE to "
                         "apply a plain peft adapter to that base without the fingerprint check")
    meta = read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("base_fingerprint", ""), str):
        raise SegdaError(f"{path} is not segda's adapter metadata (a JSON object with base_model and "
                         "base_fingerprint): copy the adapter folder again or re-run `segda adapt`")
    return meta


def read_json(path: Path):
    """A small JSON file of an adapter folder; SegdaError naming it when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SegdaError(f"{path} is damaged ({type(err).__name__}: {err}): copy the adapter folder again or re-run "
                         "`segda adapt`") from None
    except OSError as err:
        raise SegdaError(f"cannot read {path}: {err.strerror}") from None


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_adapted(adapter_dir: str | Path, base: str | None = None, *, allow_base_mismatch: bool = False):
    """Base model + adapter, with the checks that keep an adapter from silently running on the wrong base."""
    return _load_adapted(adapter_dir, base, allow_base_mismatch)[0]


def _base_of(adapter_dir, base: str | None) -> tuple[dict, str]:
    """(segda metadata, base path) of an adapter, refusing one made for another class set."""
    meta = read_metadata(adapter_dir, base)
    base_path = str(base or meta.get("base_model") or "")
    if not base_path:
        raise SegdaError(f"{adapter_dir}: no base model recorded; pass --base")
    if meta.get("num_classes", NUM_CLASSES) != NUM_CLASSES:
        raise SegdaError(f"{adapter_dir} was trained for {meta['num_classes']} classes, segda scores "
                         f"{NUM_CLASSES}: it cannot be evaluated with this class set")
    return meta, base_path


def _check_fingerprint(meta: dict, found: str, adapter_dir, base_path: str, allow_base_mismatch: bool) -> None:
    if meta and found != meta.get("base_fingerprint") and not allow_base_mismatch:
        raise SegdaError(f"adapter {adapter_dir} was trained on a base with fingerprint "
                         f"{str(meta.get('base_fingerprint'))[:16]}, but {base_path} has {found[:16]}: "
                         "use the adapter's own base, or pass --allow-base-mismatch if you know better")


def _load_adapted(adapter_dir, base, allow_base_mismatch) -> tuple[PeftModel, str]:
    meta, base_path = _base_of(adapter_dir, base)
    model = build_model(base_path)
    found = fingerprint(model)  # before peft injects its layers
    _check_fingerprint(meta, found, adapter_dir, base_path, allow_base_mismatch)
    # peft reads adapter_model.safetensors (safetensors only: there is no .bin in a segda adapter).
    read_json(Path(adapter_dir) / "adapter_config.json")  # damaged JSON: named here, not deep inside peft
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False), found
    except SafetensorError as err:
        raise SegdaError(f"{Path(adapter_dir) / WEIGHTS} is corrupt or truncated ({err}); copy the adapter again or "
                         "re-run `segda adapt`") from err
    except (ValueError, TypeError, KeyError, RuntimeError) as err:  # a config peft cannot use, shapes that differ
        raise SegdaError(f"{adapter_dir} does not fit its base {base_path} ({type(err).__name__}: "
                         f"{str(err)[:300]}): check adapter_config.json, or copy the adapter folder again") from None


def _layout(adapter_dir) -> tuple:
    """What peft injects for an adapter: adapters of one layout can live side by side on one base."""
    config = read_json(Path(adapter_dir) / "adapter_config.json")
    if not isinstance(config, dict):
        raise SegdaError(f"{Path(adapter_dir) / 'adapter_config.json'} is not a JSON object: copy the adapter again")
    return tuple(sorted(config.get("target_modules") or [])), tuple(sorted(config.get("modules_to_save") or []))


class SharedBase:
    """Many adapters of one base: the base is loaded once and the adapters are switched in place (peft's
    `load_adapter` / `set_adapter`), each with its own LoRA weights and head copies (BatchNorm statistics too).
    An adapter of another base or another layout (target modules, head parts) gets a fresh base. Every adapter
    gets load_adapted's checks, against the fingerprint of the base actually in memory."""

    def __init__(self, allow_base_mismatch: bool = False):
        self.allow_base_mismatch = allow_base_mismatch
        self.model: PeftModel | None = None
        self.key: tuple | None = None  # (base path, layout) of the model in memory
        self.base_fingerprint = ""
        self.names: dict[str, str] = {}  # adapter folder -> peft adapter name

    def activate(self, adapter_dir: str | Path, base: str | None = None) -> PeftModel:
        meta, base_path = _base_of(adapter_dir, base)
        key = (str(Path(base_path).resolve()) if Path(base_path).exists() else base_path, _layout(adapter_dir))
        folder = str(Path(adapter_dir).resolve())
        if self.model is None or key != self.key:
            self.model, self.base_fingerprint = _load_adapted(adapter_dir, base, self.allow_base_mismatch)
            self.key, self.names = key, {folder: "default"}
            return self.model
        _check_fingerprint(meta, self.base_fingerprint, adapter_dir, base_path, self.allow_base_mismatch)
        if folder not in self.names:
            name = f"adapter{len(self.names)}"
            try:
                self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
            except SafetensorError as err:
                raise SegdaError(f"{Path(adapter_dir) / WEIGHTS} is corrupt or truncated ({err}); copy the adapter "
                                 "again or re-run `segda adapt`") from err
            self.names[folder] = name
        self.model.set_adapter(self.names[folder])
        return self.model


def merge(adapted: PeftModel):
    """Fold the LoRA weights into the base and return a plain transformers model."""
    return adapted.merge_and_unload()
