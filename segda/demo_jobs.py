"""The demo's training stages as processes: one after another with their output on the terminal, or side by side
where a CPU has a core to spare, each into its own log file.

    took = run_jobs([Job("uda", argv, env, log=out / "logs" / "uda.log"), ...], slots=stage_slots(processes))

Why side by side: with one loader worker the thread budget (`segda.data.loader.thread_budget`) gives a training
process one busy thread, and the demo's tiny model leaves its worker idle most of the time, so one stage keeps a
2-core CPU half busy. The two self-training runs of the demo's earlier recipe (900 steps of 4 + 4 crops) took
171 s side by side against 157.6 + 136.8 s one after the other, with identical weights (README, `segda demo`).
The first stage to fail stops the others, and the error shows the end of its log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from segda.log import SegdaError, info
from segda.train.preempt import EXIT_PREEMPTED, StopSignals

MAX_SLOTS = 3
"""The demo's widest phase: LoRA, self-training and its baseline, which need only the pretrained source."""
PROGRESS = re.compile(rb"(\d+)/(\d+) \[")
"""A tqdm bar's `step/total [` in a log: the heartbeat's progress figure."""


@dataclass(frozen=True)
class Job:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path | None = None
    """Where its output goes; None: the terminal (only where jobs run one at a time)."""


def stage_slots(processes: int, gpu: bool | None = None, cores: int | None = None) -> int:
    """How many stages run at once: one per core, up to MAX_SLOTS, where each stage is one CPU process; one where
    a stage is a multi-process launch (it uses every core) or runs on a GPU (the stages would share it)."""
    from segda.data.loader import available_cores

    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if processes > 1 or gpu:
        return 1
    return max(1, min(MAX_SLOTS, cores or available_cores()))


def run_jobs(jobs: list[Job], slots: int, *, heartbeat: float = 30.0, poll: float = 0.2) -> dict[str, float]:
    """Run `jobs` in their order, at most `slots` at once; {name: seconds each took}. A job that exits non-zero
    stops the ones still running and raises SegdaError; a SIGTERM or SIGUSR1 to this process stops them and exits
    (a job left behind would go on writing its run folder after the study's lock is gone). Main thread only."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if len({job.name for job in jobs}) != len(jobs):
        raise ValueError(f"job names must differ: {[job.name for job in jobs]}")
    if min(slots, len(jobs)) > 1 and any(job.log is None for job in jobs):
        raise ValueError("jobs that run side by side need a log file each")
    pending, running, took = list(jobs), {}, {}
    beat = time.monotonic()
    # SIGTERM (kill, timeout, a CI cancel) is recorded, and acted on at the loop's next turn, not raised in the
    # handler: then no job is ever started but unknown to `finally`, which stops them
    signals = StopSignals()
    try:
        while pending or running:
            if signals.received:
                raise SystemExit(128 + signals.received)
            while pending and len(running) < slots:
                job = pending.pop(0)
                running[job.name] = (job, _start(job), time.perf_counter())
            for name, (job, proc, started) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                took[name] = time.perf_counter() - started
                if code != 0:
                    raise SegdaError(_failed(job, code))
                if job.log is not None:
                    info(f"{name} done in {took[name]:.0f} s: {_last_line(job.log)}")
            logged = [(name, job) for name, (job, _, _) in running.items() if job.log is not None]
            if logged and time.monotonic() - beat >= heartbeat:
                beat = time.monotonic()
                info("  ".join(f"{name} {_progress(job.log)}" for name, job in logged))
            time.sleep(poll if running else 0)
    finally:
        _stop([proc for _, proc, _ in running.values()])
        signals.restore()
    return took


def _start(job: Job) -> subprocess.Popen:
    env = {**os.environ, **job.env}
    if job.log is None:
        return subprocess.Popen(job.argv, env=env)  # fixed argv, no shell
    job.log.parent.mkdir(parents=True, exist_ok=True)
    info(f"{job.name}: started, output in {job.log}")
    with open(job.log, "wb") as log:  # the child holds its own copy of the descriptor
        # unbuffered: a stage killed outright still leaves its last lines in the log, in order
        return subprocess.Popen(job.argv, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every job at once (a trainer ends its step and leaves), then SIGKILL to any still there 10 s on."""
    alive = [proc for proc in procs if proc.poll() is None]
    for proc in alive:
        proc.terminate()
    deadline = time.monotonic() + 10
    for proc in alive:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read()


def _lines(path: Path) -> list[str]:
    """The log's last lines as a terminal shows them: a tqdm bar redraws itself after a carriage return, so a line
    shows its last drawing."""
    try:
        text = _tail(path).decode(errors="replace")
    except OSError as err:
        return [f"(its log cannot be read: {err})"]
    shown = ([part for part in line.split("\r") if part.strip()] for line in text.split("\n"))
    return [parts[-1] for parts in shown if parts]


def _last_line(path: Path) -> str:
    lines = _lines(path)
    return lines[-1].strip() if lines else "(no output)"


def _progress(path: Path) -> str:
    try:
        found = PROGRESS.findall(_tail(path))
    except OSError:
        return "(no log)"
    return "{}/{}".format(*map(int, found[-1])) if found else "starting"


def _failed(job: Job, code: int) -> str:
    how = f"failed (exit {code})"
    if code == EXIT_PREEMPTED:  # a signal reached the stage itself
        how = "was preempted (exit 75: a signal reached it; its last checkpoint is in its run folder)"
    if code < 0:  # Popen's way of saying a signal ended it
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        how = f"was killed by signal {-code} ({name}{': out of memory?' if code == -signal.SIGKILL else ''})"
    if job.log is None:
        return f"the {job.name} stage {how}; its output is above"
    tail = "\n".join("  " + line for line in _lines(job.log)[-15:])
    return f"the {job.name} stage {how}; the end of its log, {job.log}:\n{tail}"
