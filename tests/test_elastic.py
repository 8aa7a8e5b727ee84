"""Preemption and elastic resume: SIGTERM -> one checkpoint -> exit 75 -> an exact continuation; kill -9 on one
number of processes and a resume on another, every sample of the interrupted epoch trained on exactly once; the
SLURM script requeueing itself; and resumes that prove they continued rather than started over."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import REPO, TINY_MODEL, cpu_env, launch_args, segda_here
from segda.rundir import LOCK

DEMO = REPO / "configs" / "demo"


def args(manifest, *extra, max_steps=40) -> list[str]:
    return ["pretrain", str(DEMO / "pretrain.yaml"), "--max-steps", str(max_steps), "--set",
            f"data.train={manifest}", "data.batch_size=2", "data.workers=1", "data.crop_size=128x96",
            "data.base_size=160x88", "train.log_every=1", "train.log_samples=true", "train.checkpoint_every=0",
            TINY_MODEL, *extra]


def start(cmd: list[str], processes: int = 1) -> subprocess.Popen:
    prefix = ([sys.executable, "-m", "segda"] if processes == 1 else
              launch_args(processes) + ["-m", "segda"])
    return subprocess.Popen(prefix + cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: kill -9 takes the workers too


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def sample_log(run: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((run / "samples").glob("rank-*.jsonl"))
            for line in f.read_text().splitlines()]


def final_weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, gta5_manifest):
    out = tmp_path_factory.mktemp("straight") / "run"
    segda_here(*args(gta5_manifest), "--out", out)
    return out


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, gta5_manifest):
    """A run stopped by SIGTERM after a few steps: (run dir, step it stopped at, seconds from signal to exit)."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    proc = start(args(gta5_manifest) + ["--out", str(out)])
    wait_for(lambda: len(logged_steps(out)) >= 3 or proc.poll() is not None, "three steps")
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 75, f"expected the preemption status 75, got {proc.returncode}:\n{err[-3000:]}"
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "preempted" and "preempted" in err and "--resume auto" in err
    return out, run["step"], seconds


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_within_seconds_and_the_resume_continues_exactly(
        preempted, straight, gta5_manifest, tmp_path):
    out, step, seconds = preempted
    assert seconds < 10, f"{seconds:.1f} s from SIGTERM to exit"
    assert 3 <= step < 40 and (out / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()
    assert not (out / "model").exists()
    run = tmp_path / "run"
    shutil.copytree(out, run)
    proc = segda_here(*args(gta5_manifest), "--out", run, "--resume", "auto")
    assert f"resumed from {run / 'checkpoints' / f'step-{step:06d}'} at step {step}" in proc.stderr
    assert logged_steps(run) == list(range(1, 41)), "steps after the checkpoint appended once, none repeated"
    # the same samples, step by step, as the run that was never stopped: the data position was restored
    keyed = lambda r: [(line["step"], line["keys"]) for line in sample_log(r)]  # noqa: E731
    assert keyed(run) == keyed(straight)
    assert max_diff(final_weights(run), final_weights(straight)) <= 1e-6
    counted = [json.loads((r / "run.json").read_text())["images_seen"] for r in (run, straight)]
    assert counted[0] == counted[1]


@pytest.mark.slow
def test_a_resume_that_restored_nothing_would_fail(preempted, straight, gta5_manifest, tmp_path):
    """Halve the checkpoint's weights: a real restore now ends elsewhere; a restart from scratch (a no-op restore)
    would still end on the straight run's weights, and so would fail here."""
    out, step, _ = preempted
    run = tmp_path / "run"
    shutil.copytree(out, run)
    weights = run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"
    save_file({k: v * 0.5 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))
    segda_here(*args(gta5_manifest), "--out", run, "--resume", "auto")
    assert max_diff(final_weights(run), final_weights(straight)) > 1e-3


@pytest.mark.slow
def test_a_changed_learning_rate_on_resume_takes_effect_and_says_so(preempted, gta5_manifest, tmp_path):
    from segda.train.optim import lr_factor

    out, step, _ = preempted
    run = tmp_path / "run"
    shutil.copytree(out, run)
    changed = ("optim.lr=0.002", "optim.warmup_steps=5", "optim.weight_decay=0.05", "optim.betas=[0.8,0.99]",
               "train.checkpoint_every=39")
    proc = segda_here(*args(gta5_manifest, *changed), "--out", run, "--resume", "auto")
    assert "optim.lr was 0.0006 in" in proc.stderr and f"takes effect from step {step + 1}" in proc.stderr
    groups = json.loads((run / "checkpoints" / "step-000039" / "optimizer.json").read_text())["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05} and all(g["betas"] == [0.8, 0.99] for g in groups)
    lines = {json.loads(line)["step"]: json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()}
    # the first resumed step ran at the new peak lr on the new warmup, from the restored step count
    assert lines[step + 1]["lr"] == pytest.approx(0.002 * lr_factor(step + 1, 5, 40, 1.0), rel=1e-6)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), each before its own children; one that exits meanwhile is skipped."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            found += [int(child), *_descendants(int(child))]
    return found


def _wait_until_gone(pids: list[int], seconds: float = 10) -> None:
    """A killed rank exits (its run-folder lock with it) a moment after SIGKILL; orphans are reaped by init. A
    resume started at once could still find the lock held; a requeued job starts seconds later."""
    deadline = time.monotonic() + seconds
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            assert time.monotonic() < deadline, f"process {pid} still runs {seconds} s after SIGKILL"
            time.sleep(0.02)


def _lock_owner(out: Path) -> list[int]:
    """The segda process named in the run folder's lock file, if that process is still a segda process."""
    try:
        pid = int(json.loads((out / LOCK).read_text())["pid"])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [pid] if b"segda" in command else []


def _wait_until_unlocked(lock: Path, who: str, seconds: float = 10) -> None:
    """The run folder's lock is free again: a killed process's POSIX lock goes when it exits."""
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{lock} still locked {seconds} s after SIGKILL ({who})"
        finally:
            os.close(fd)  # closing it drops this probe's own lock
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _kill_after_checkpoint(proc: subprocess.Popen, out: Path) -> dict:
    wait_for(lambda: (out / "checkpoints" / "step-000002" / "state.json").is_file() or proc.poll() is not None,
             "the step-2 checkpoint")
    assert proc.poll() is None, f"the run ended before the step-2 checkpoint:\n{proc.communicate()[1][-3000:]}"
    tree = [proc.pid, *_descendants(proc.pid)]
    owner = _lock_owner(out)  # rank 0, the process holding the run folder: in the tree, unless the walk missed it
    for pid in dict.fromkeys([*tree, *owner]):  # the ranks too: torch's launcher starts each in its own session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    _wait_until_gone(list(dict.fromkeys([*tree[1:], *owner])))
    _wait_until_unlocked(out / LOCK, f"launch {proc.pid}, its processes {tree[1:]}, lock owner {owner}")
    assert not (out / "model").exists(), "the run finished before the kill: the test proved nothing"
    newest = sorted((out / "checkpoints").glob("step-*/state.json"))[-1]
    return json.loads(newest.read_text())


def _epoch_keys(run: Path, epoch: int) -> list[str]:
    return [key for line in sample_log(run) if line["epoch"] == epoch for key in line["keys"]]


@pytest.mark.slow
def test_kill_minus_nine_on_two_processes_resumes_on_one(tmp_path, gta5_manifest):
    out = tmp_path / "run"
    cmd = args(gta5_manifest, "train.checkpoint_every=2", "data.crop_size=64x64", max_steps=200)
    state = _kill_after_checkpoint(start(cmd + ["--out", str(out)], processes=2), out)
    assert state["world_size"] == 2
    epoch, consumed = state["data"]["epoch"], state["data"]["consumed"]
    samples = json.loads(Path(gta5_manifest).read_text())["num_samples"]
    end = samples // 2 * 2  # what two ranks plan per epoch
    steps_left = -(-(end - consumed) // 4) + 1  # global batch 4 kept: grad_accum 1 -> 2; one step into the next
    proc = segda_here(*cmd[:2], "--max-steps", state["step"] + steps_left, *cmd[4:], "--out", out, "--resume", "auto")
    assert "train.grad_accum becomes 2, keeping the global batch of 4" in proc.stderr
    trained = _epoch_keys(out, epoch)
    assert len(trained) == len(set(trained)) == end, "the interrupted epoch: every planned sample once, across both"
    assert json.loads((out / "run.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_kill_minus_nine_on_one_process_resumes_on_two_with_other_workers(tmp_path, gta5_manifest):
    out = tmp_path / "run"
    cmd = args(gta5_manifest, "train.checkpoint_every=2", "train.grad_accum=2", "data.crop_size=64x64",
               max_steps=200)
    state = _kill_after_checkpoint(start(cmd + ["--out", str(out)]), out)
    epoch, consumed = state["data"]["epoch"], state["data"]["consumed"]
    samples = json.loads(Path(gta5_manifest).read_text())["num_samples"]
    steps_left = -(-(samples - consumed) // 4) + 1
    rest = [*cmd[:2], "--max-steps", str(state["step"] + steps_left), *cmd[4:], "data.workers=2", "--out", str(out),
            "--resume", "auto"]
    refused = subprocess.run(launch_args(3) + ["-m", "segda", *rest], env=cpu_env(), capture_output=True, text=True,
                             timeout=300)  # a global batch of 4 cannot be kept by 3 processes of batch 2
    assert refused.returncode != 0 and "train.on_world_change=keep_per_rank_batch" in refused.stderr
    resumed = subprocess.run(launch_args(2) + ["-m", "segda", *rest], env=cpu_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    trained = _epoch_keys(out, epoch)
    assert len(trained) == len(set(trained)) == samples, "one process plans every sample; each trained once"
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["replicas_identical"] is True and run["config"]["train"]["grad_accum"] == 1


@pytest.mark.slow
def test_the_slurm_script_checkpoints_on_its_signal_and_requeues(tmp_path, gta5_manifest):
    """launch/slurm/multinode.sbatch as shipped, with stand-ins for srun and scontrol: SIGUSR1 to the batch script
    (what --signal=B:USR1@180 sends) -> every rank checkpoints -> run.json says preempted -> requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    shims = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": f'#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {requeued}; fi\n',
    }
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "run"
    env = {**cpu_env(), "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_ID": "4242", "MAIN_PORT": str(_free_port())}
    cmd = args(gta5_manifest, "data.crop_size=64x64", max_steps=500)[0:] + ["--out", str(out)]
    script = subprocess.Popen(["bash", str(REPO / "launch" / "slurm" / "multinode.sbatch"), *cmd], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(out)) >= 2 or script.poll() is not None, "two steps under the script")
    os.kill(script.pid, signal.SIGUSR1)
    _, err = script.communicate(timeout=120)
    assert script.returncode == 0, err[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "preempted" and run["world_size"] == 2
    assert len(list((out / "checkpoints" / f"step-{run['step']:06d}").glob("rng-*.safetensors"))) == 2
    assert requeued.read_text().split() == ["requeue", "4242"]
    # The requeued job fails before training (a bad setting): the old "preempted" must not requeue it again.
    time.sleep(1.1)  # run.json's mtime has a one-second resolution in the script's check
    requeued.unlink()
    again = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "multinode.sbatch"), *cmd[:-2],
                            "data.batch_size=0", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode != 0 and not requeued.exists(), again.stderr[-2000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_checkpoint_that_only_some_nodes_see_stops_every_rank_with_the_cause(tmp_path, gta5_manifest):
    """Two "machines" on one host with different --out folders: machine 0 sees a checkpoint, machine 1 does not,
    as on nodes without a shared filesystem. Every rank must stop naming the cause, not hang or diverge."""
    cmd = args(gta5_manifest, "train.checkpoint_every=2", "data.crop_size=64x64", max_steps=4)
    seen = tmp_path / "seen"
    segda_here(*cmd, "--out", seen)
    port = _free_port()
    procs = []
    for machine, out in ((0, seen), (1, tmp_path / "unseen")):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                  "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                  "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
        resume = ["train.on_world_change=keep_per_rank_batch", "--out", str(out), "--resume", "auto"]
        # the same 4 steps would find a finished run (nothing to do): ask for more, from the step-2 checkpoint
        longer = args(gta5_manifest, "train.checkpoint_every=2", "data.crop_size=64x64", max_steps=6)
        procs.append(subprocess.Popen(launch + ["-m", "segda", *longer, *resume],
                                      env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    for err in errors:
        assert "not visible on every node" in err and "filesystem every node mounts" in err, err[-3000:]


@pytest.mark.slow
def test_sigusr1_also_stops_cleanly_and_time_based_checkpoints_are_written(tmp_path, gta5_manifest):
    out = tmp_path / "usr1"
    proc = start(args(gta5_manifest, "train.checkpoint_minutes=0.002", max_steps=400) + ["--out", str(out)])
    wait_for(lambda: len(logged_steps(out)) >= 4 or proc.poll() is not None, "four steps")
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "SIGUSR1" in err, err[-3000:]
    run = json.loads((out / "run.json").read_text())
    # train.checkpoint_every=0: every checkpoint but the last came from the 0.12 s clock
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps[-1] == run["step"] and len(steps) == 2, steps  # keep_checkpoints=2: the clock wrote earlier ones
    assert steps[0] < run["step"]
