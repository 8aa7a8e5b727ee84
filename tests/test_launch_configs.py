"""Every Accelerate config under launch/accelerate/ runs as shipped: its own mixed precision and distributed type,
overriding only what a CPU machine cannot have (GPU count, so the process count; a fixed port that may be taken).
DeepSpeed runs without ACCELERATE_USE_CPU (which would silently turn it into plain DDP, and is refused)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import REPO, TINY_MODEL, cpu_env, free_port_for_launch

pytestmark = pytest.mark.slow
CONFIGS = REPO / "launch" / "accelerate"
DEMO = REPO / "configs" / "demo"
TESTED = {"cpu_ddp.yaml", "multi_gpu.yaml", "single_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml"}


def shipped(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def launch(name: str, *args, cpu: bool = True, background: bool = False, **overrides):
    """`accelerate launch --config_file launch/accelerate/NAME [--key value ...] -m segda ARGS`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / name)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    cmd += ["-m", "segda", *map(str, args)]
    env = cpu_env()
    if not cpu:  # DeepSpeed: on the machine's GPUs, or on CPU processes (its own CPU accelerator) where none is
        del env["ACCELERATE_USE_CPU"], env["CUDA_VISIBLE_DEVICES"]
        env.update({k: v for k, v in os.environ.items() if k == "CUDA_VISIBLE_DEVICES"})
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}"
    return proc


def data_args(manifest, *extra) -> list[str]:
    return ["--set", f"data.train={manifest}", "data.batch_size=2", "data.workers=1", "data.crop_size=64x64",
            "data.base_size=160x88", "data.eval_size=160x88", "train.log_every=1", *extra]


def run_record(out: Path, config: dict, world: int, distributed: str) -> dict:
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["world_size"] == world, run
    assert run["mixed_precision"] == config["mixed_precision"], "the config's own mixed precision must be used"
    assert run["distributed_type"].endswith(distributed), run["distributed_type"]
    assert run["replicas_identical"] is True
    return run


def test_every_shipped_launch_config_is_tested_here():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == TESTED, "a new launch config needs its test in this file"


@pytest.fixture(scope="module")
def ddp_base(tmp_path_factory, gta5_manifest):
    """cpu_ddp.yaml exactly as shipped (2 processes, bf16): a pretrain run the adapt tests start from."""
    out = tmp_path_factory.mktemp("cpu-ddp") / "run"
    launch("cpu_ddp.yaml", "pretrain", DEMO / "pretrain.yaml", "--out", out, "--max-steps", 2,
           *data_args(gta5_manifest, TINY_MODEL, "train.grad_accum=2"))
    return out


def test_cpu_ddp_as_shipped(ddp_base):
    config = shipped("cpu_ddp.yaml")
    run = run_record(ddp_base, config, config["num_processes"], "MULTI_CPU")
    assert run["images_seen"] == 2 * 2 * 2 * 2  # batch x processes x grad_accum x steps
    assert (ddp_base / "model" / "model.safetensors").is_file()


def test_multi_gpu_on_cpu_processes(ddp_base, cityscapes_manifest, tmp_path):
    """multi_gpu.yaml with 2 CPU processes in place of 8 GPUs: LoRA adaptation under its bf16."""
    out = tmp_path / "run"
    launch("multi_gpu.yaml", "adapt", DEMO / "adapt.yaml", "--out", out, "--max-steps", 2,
           *data_args(cityscapes_manifest, f"model.name_or_path={ddp_base / 'model'}"),
           num_processes=2, main_process_port=0)
    run_record(out, shipped("multi_gpu.yaml"), 2, "MULTI_CPU")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_single_gpu_as_shipped_on_the_cpu(tmp_path, gta5_manifest):
    out = tmp_path / "run"
    launch("single_gpu.yaml", "pretrain", DEMO / "pretrain.yaml", "--out", out, "--max-steps", 2,
           *data_args(gta5_manifest, TINY_MODEL))
    run = run_record(out, shipped("single_gpu.yaml"), 1, "NO")
    assert run["images_seen"] == 2 * 2


def test_multi_node_as_two_machines_on_one_host(tmp_path, gta5_manifest):
    """multi_node.yaml started once per machine with its --machine_rank, as launch/slurm/multinode.sbatch does."""
    config = shipped("multi_node.yaml")
    port, out = free_port_for_launch(), tmp_path / "run"
    procs = [launch("multi_node.yaml", "pretrain", DEMO / "pretrain.yaml", "--out", out, "--max-steps", 2,
                    *data_args(gta5_manifest, TINY_MODEL), background=True, num_processes=config["num_machines"],
                    machine_rank=rank, main_process_port=port) for rank in range(config["num_machines"])]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outputs)
    run = run_record(out, config, config["num_machines"], "MULTI_CPU")
    assert run["images_seen"] == 2 * 2 * 2, "both machines' ranks must have trained"


def test_deepspeed_zero2_as_shipped_selftrains_in_bf16_and_resumes(ddp_base, gta5_manifest, cityscapes_manifest,
                                                                   tmp_path):
    """The shipped ZeRO-2 config with its bf16 (DeepSpeed casts the model), running LoRA self-training, the loop's
    largest step (source loss, EMA teacher, mixed target): 4 steps straight, and the same 4 steps resumed at step 2
    from its DeepSpeed checkpoint in a fresh folder. The resumed run trains steps 3 and 4 only, on the same samples,
    and ends with the same student and teacher. 2 CPU processes here; on a GPU machine, its GPUs."""
    pytest.importorskip("deepspeed", reason="install the deepspeed extra: DS_BUILD_OPS=0 pip install -e .[deepspeed]")
    config = shipped("deepspeed_zero2.yaml")
    assert config["mixed_precision"] == "bf16"
    ranks = torch.cuda.device_count() or 2
    args = ["adapt", DEMO / "selftrain.yaml", "--max-steps", 4,
            *data_args(gta5_manifest, f"model.name_or_path={ddp_base / 'model'}", "train.checkpoint_every=2",
                       "train.log_samples=true", f"data.val={cityscapes_manifest}",
                       f"data.target={cityscapes_manifest}", "data.target_base_size=160x80", "adapt.ema_alpha=0.9")]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("deepspeed_zero2.yaml", *args[:2], "--out", straight, *args[2:], cpu=False, num_processes=ranks,
           main_process_port=0)
    run = run_record(straight, config, ranks, "DEEPSPEED")
    assert run["final"]["val_miou"] > 0  # evaluation ran on the bf16 model too
    assert (straight / "checkpoints" / "step-000002" / "method.safetensors").is_file(), "the teacher is checkpointed"

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    proc = launch("deepspeed_zero2.yaml", *args[:2], "--out", resumed, *args[2:], "--resume", "auto", cpu=False,
                  num_processes=ranks, main_process_port=0)
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    run_record(resumed, config, ranks, "DEEPSPEED")

    def steps(run_dir):
        return {(rank, line["step"]): line["keys"] for rank in range(ranks) for line in map(
            json.loads, (run_dir / "samples" / f"rank-{rank}.jsonl").read_text().splitlines())}

    assert {s for _, s in steps(resumed)} == {3, 4}, "the resumed run must train steps 3 and 4 only"
    assert steps(resumed) == {k: v for k, v in steps(straight).items() if k[1] > 2}
    # GPU kernels (atomic adds in backward passes) are not bit-reproducible: the student came back within 1.2e-4 on
    # an H200. A teacher lost on resume differs by 1e-3, a student restarted from scratch by far more.
    tolerance = 5e-4 if torch.cuda.is_available() else 1e-6
    for folder in ("adapter", "adapter-teacher"):  # the student (adapt.save: student) and the EMA teacher
        a, b = (load_file(str(d / folder / "adapter_model.safetensors")) for d in (straight, resumed))
        assert a.keys() == b.keys()
        assert {v.dtype for v in b.values() if v.is_floating_point()} == {torch.float32}, "saved in fp32, not bf16"
        # ZeRO's fp32 master weights (and the fp32 teacher), not the bf16 module's values upcast
        assert any(bool((v != v.bfloat16().float()).any()) for k, v in b.items() if "lora_" in k), folder
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert worst <= tolerance, f"{folder}: the resumed weights differ from the straight run's by {worst}"


def test_deepspeed_zero2_pretrain_as_shipped(tmp_path, gta5_manifest):
    """The issue's reproducer: `pretrain` under the shipped ZeRO-2 config crashed on its first forward in bf16."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    ranks = torch.cuda.device_count() or 2  # a GPU machine's GPUs, else 2 CPU processes
    launch("deepspeed_zero2.yaml", "pretrain", DEMO / "pretrain.yaml", "--out", out, "--max-steps", 2,
           *data_args(gta5_manifest, TINY_MODEL), cpu=False, num_processes=ranks, main_process_port=0)
    run_record(out, shipped("deepspeed_zero2.yaml"), ranks, "DEEPSPEED")
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_deepspeed_under_accelerate_use_cpu_is_refused(ddp_base, cityscapes_manifest, tmp_path):
    pytest.importorskip("deepspeed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "deepspeed_zero2.yaml"),
           "--num_processes", "2", "--main_process_port", "0", "-m", "segda", "adapt", str(DEMO / "adapt.yaml"),
           "--out", str(tmp_path / "r"), "--max-steps", "2",
           *data_args(cityscapes_manifest, f"model.name_or_path={ddp_base / 'model'}")]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asks for DeepSpeed" in proc.stderr and "unset ACCELERATE_USE_CPU" in proc.stderr
    assert not (tmp_path / "r" / "adapter").exists()


def test_a_library_caller_is_refused_too_when_deepspeed_became_plain_ddp(monkeypatch):
    """The CLI refuses ACCELERATE_USE_CPU with a DeepSpeed launch before torch loads; `segda.train.train` called
    from Python checks what Accelerate actually set up."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from segda.log import SegdaError
    from segda.train.setup import _refuse_silent_deepspeed_loss

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(SegdaError, match="would be MULTI_CPU .*unset ACCELERATE_USE_CPU"):
        _refuse_silent_deepspeed_loss(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    with pytest.raises(SegdaError, match="import deepspeed"):
        _refuse_silent_deepspeed_loss(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    _refuse_silent_deepspeed_loss(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    _refuse_silent_deepspeed_loss(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
