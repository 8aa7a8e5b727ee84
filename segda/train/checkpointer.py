"""One checkpointer for every stateful part of a run, as torchtitan's CheckpointManager: the loop hands it a dict
of parts (model, optimizer, scheduler, method, data position, train state, RNG, loss scaler), each with
`state_dict()` / `load_state_dict()`, and it writes or restores them all.

    RUN_DIR/checkpoints/step-000200/
        state.json                     step, stage, world size, config, and every part without tensors
        model.safetensors              \
        optimizer.safetensors + .json   |  parts with tensors: safetensors, their other values beside in JSON
        method.safetensors             /   (self-training's EMA teacher)
        rng-<rank>.safetensors         every rank's RNG, gathered over the network (no shared filesystem needed)

Nothing is pickled, so resuming never unpickles a file. A checkpoint folder is written under a temporary name and
renamed when complete; `--resume auto` takes the newest complete one. DeepSpeed shards its optimizer state: under
it the model, optimizer and RNG go through DeepSpeed's own format (`deepspeed/`, which pickles: resume those only
from your own runs) and the other parts are written as above. Both backends sit behind `Checkpointer`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segda import atomic
from segda.log import SegdaError
from segda.rundir import STATE, checkpoint_dir, list_checkpoints

TENSOR_PARTS = ("model", "optimizer", "method")
"""Parts stored as safetensors (their non-tensor values in NAME.json); every other part goes into state.json."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """Save and restore `parts` ({name: Stateful}): "rng" is per rank, the rest is the same on every rank and written
    by the main process. The folder is assembled under a temporary name and renamed when complete. Call `save` and
    `load` on every rank."""

    def __init__(self, run_dir: Path, accelerator, control, keep: int, deepspeed: bool):
        self.run_dir, self.acc, self.keep = Path(run_dir), accelerator, keep
        self.backend = _DeepSpeedFiles(accelerator) if deepspeed else _SafetensorsFiles(control)

    def save(self, step: int, parts: dict[str, Stateful], meta: dict) -> Path:
        """Write checkpoint `step`; `meta` (stage, world size, config, ...) goes into state.json as is."""
        final = checkpoint_dir(self.run_dir, step)
        partial = final.with_name(final.name + atomic.TMP_MARK + "partial")  # one name every rank knows
        if self.acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.acc.wait_for_everyone()
        states = {name: part.state_dict() for name, part in parts.items() if name not in self.backend.owns}
        self.backend.save(partial, parts)  # every rank: DeepSpeed's shards, or the RNG states gathered
        if self.acc.is_main_process:
            with atomic.os_errors(final):
                json_parts = {}
                for name, state in states.items():
                    if name in TENSOR_PARTS:
                        _write_tensor_part(partial, name, state)
                    else:
                        json_parts[name] = state
                (partial / STATE).write_text(json.dumps({**meta, "step": step, **json_parts}, indent=2))
                atomic.publish_dir(partial, final)
            prune(self.run_dir, self.keep)
        self.acc.wait_for_everyone()
        return final

    def load(self, path: Path, parts: dict[str, Stateful], state: dict) -> None:
        """Restore every part from checkpoint `path`, whose state.json (`rundir.read_checkpoint_state`) is `state`."""
        self.backend.load(path, parts, state)
        for name, part in parts.items():
            if name in self.backend.owns:
                continue
            if name in TENSOR_PARTS:
                load_tensor_part(part, path, name)
            elif name in state:
                part.load_state_dict(state[name])


class _SafetensorsFiles:
    """Every part in segda's own files; each rank's RNG reaches the main process over the network."""

    owns = ("rng",)

    def __init__(self, control):
        self.control = control

    def save(self, folder: Path, parts) -> None:
        from segda.train.rng import pack, unpack

        if "rng" not in parts:
            return
        states = [unpack(t) for t in self.control.gather_bytes(pack(parts["rng"].state_dict()))]
        if self.control.rank == 0:
            for rank, tensors in enumerate(states):
                save_file(tensors, str(folder / f"rng-{rank}.safetensors"))

    def load(self, path: Path, parts, state: dict) -> None:
        if "rng" in parts:
            rng = parts["rng"]
            file = path / f"rng-{rng.rank}.safetensors"
            # a rank that did not exist when the checkpoint was written starts a fresh stream (segda.train.rng)
            rng.load_state_dict(_load(file, path) if file.is_file() else {"fresh_at_step": state["step"]})


class _DeepSpeedFiles:
    """DeepSpeed shards the optimizer state: model, optimizer and RNG go through its own format, every rank
    writing its part; the main process then adds the other parts."""

    owns = ("model", "optimizer", "rng")

    def __init__(self, accelerator):
        self.acc = accelerator

    def save(self, folder: Path, parts) -> None:
        self.acc.save_state(str(folder / "deepspeed"))
        self.acc.wait_for_everyone()  # every rank's part is on disk before the folder is completed

    def load(self, path: Path, parts, state: dict) -> None:
        self.acc.load_state(str(path / "deepspeed"))  # DeepSpeed's own format: resume only from your own runs


def _write_tensor_part(folder: Path, name: str, state: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    rest = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    if rest:
        (folder / f"{name}.json").write_text(json.dumps(rest))


def load_tensor_part(part: Stateful, path: Path, name: str) -> None:
    """Restore `part` from checkpoint `path`'s NAME files. Tensors that do not fit the part (a checkpoint written by
    another model's code: the config's architecture keys were checked before, `segda.resume`) are named, not a torch
    traceback."""
    try:
        part.load_state_dict(_read_tensor_part(path, name))
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        detail = " ".join(str(err).split())
        raise SegdaError(f"checkpoint {path}: its {name} tensors do not fit the {name} this run builds "
                         f"({detail[:300]}); it was written by other code or another model: resume it with the segda "
                         f"version that wrote it, or start a new run folder (--out)") from None


def _read_tensor_part(path: Path, name: str) -> dict:
    tensors, rest = path / f"{name}.safetensors", path / f"{name}.json"
    out = _load(tensors, path) if tensors.is_file() else {}
    if rest.is_file():
        try:
            out.update(json.loads(rest.read_text()))
        except (OSError, ValueError) as err:
            raise _damaged(path, err) from err
    return out


def _load(file: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise _damaged(checkpoint, err) from err


def _damaged(path: Path, err: Exception) -> SegdaError:
    return SegdaError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); resume from an older one with "
                      f"--resume {path.parent}/step-NNNNNN, or delete this folder")
