"""What a model folder must hold, checked without loading torch: `segda adapt` with a mistyped base says so in a
fraction of a second instead of after the seconds that importing torch and transformers take."""

from __future__ import annotations

from pathlib import Path

from segda.log import SegdaError


def check_model_folder(name_or_path: str) -> None:
    """Refuse a local model folder without config.json, or one holding only pickled weights; a hub id passes."""
    if not name_or_path:
        return  # random init from model.config
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise SegdaError(f"model folder {path} has no config.json: give a folder written by `segda pretrain` "
                         "(RUN_DIR/model) or `save_pretrained`, or a hub id like nvidia/mit-b0")
    if looks_local and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise SegdaError(f"{path} holds only pickled .bin weights: segda reads safetensors only (a pickle can run "
                         "code). In an environment you trust, load it with transformers and save_pretrained("
                         "safe_serialization=True), then point here")
