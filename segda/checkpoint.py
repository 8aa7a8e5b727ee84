"""Resumable checkpoints in safetensors + JSON: model, optimizer, scheduler, RNG and stream position.

    RUN_DIR/checkpoints/step-000200/{model.safetensors, optimizer.safetensors, state.json, rng-<rank>.safetensors}

Nothing is pickled: tensors go to safetensors, the rest to JSON, so resuming never unpickles a file. Each
checkpoint folder is written under a temporary name and renamed when complete; `--resume auto` takes the newest
complete one. (DeepSpeed shards its optimizer state; under DeepSpeed, Accelerate's own save_state is used.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segda import atomic
from segda.log import SegdaError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of run_dir (None if there is none); a path: that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise SegdaError(f"--resume {resume}: no checkpoint there (expected {path}/state.json); "
                         f"use --resume auto to take the newest under {run_dir}/checkpoints")
    return path


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in rest["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def pack_rng() -> torch.Tensor:
    """This process's RNG states as one uint8 tensor (CPU state, then CUDA's if any): all ranks' have one size."""
    return torch.cat([t.view(torch.uint8).flatten() for t in rng_tensors().values()])


def unpack_rng(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    cpu_size = torch.get_rng_state().numel()
    out = {"cpu": packed[:cpu_size].clone()}
    if packed.numel() > cpu_size:
        out["cuda"] = packed[cpu_size:].clone()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, optimizer, state: dict,
                    rng: list[dict[str, torch.Tensor]], keep: int, method_state: dict | None = None) -> Path:
    """Main process: write the checkpoint folder atomically (every rank's RNG state included), prune old ones."""
    final = checkpoint_dir(run_dir, step)
    with atomic.atomic_path(final) as tmp, atomic.os_errors(final):
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        tensors, rest = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(rest))
        for rank, tensors in enumerate(rng):
            save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
        save_method_state(tmp, method_state or {})
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    prune(run_dir, keep)
    return final


METHOD_STATE = "method.safetensors"


def save_method_state(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The training method's own tensors (self-training's EMA teacher), if it has any."""
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / METHOD_STATE))


def load_method_state(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / METHOD_STATE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise SegdaError(f"checkpoint {folder} is damaged ({type(err).__name__}: {err}); resume from an older one "
                         f"with --resume {folder.parent}/step-NNNNNN, or delete this folder") from err


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict, dict, dict | None]:
    """(model tensors, optimizer tensors, optimizer rest, this rank's RNG tensors or None when the checkpoint was
    written by fewer processes); state.json is the caller's."""
    rng_file = path / f"rng-{rank}.safetensors"
    try:
        return (load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors")),
                json.loads((path / "optimizer.json").read_text()),
                load_file(str(rng_file)) if rng_file.is_file() else None)
    except (SafetensorError, OSError, ValueError) as err:
        raise SegdaError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); resume from an older one "
                         f"with --resume {path.parent}/step-NNNNNN, or delete this folder") from err
