"""The demo's stages side by side (`segda.demo_jobs`), with real child processes: order, slots, logs, failure."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from segda import demo_jobs
from segda.demo_jobs import Job, run_jobs, stage_slots
from segda.log import SegdaError


def _python(name: str, code: str, tmp_path, log: bool = True) -> Job:
    return Job(name, [sys.executable, "-c", code], {"DEMO_JOB_NAME": name},
               tmp_path / "logs" / f"{name}.log" if log else None)


def _stamped(name: str, seconds: float, tmp_path, log: bool = True) -> Job:
    """Writes when it started and ended (monotonic clock, shared by every process of the machine)."""
    stamp = tmp_path / f"{name}.stamp"
    return _python(name, f"import os, time; a = time.monotonic(); time.sleep({seconds}); "
                         f"open({str(stamp)!r}, 'w').write(f'{{a}} {{time.monotonic()}}'); "
                         "print('working'); print('ran as', os.environ['DEMO_JOB_NAME'], "
                         "os.environ.get('SEGDA_TEST_INHERITED'), os.readlink('/proc/self/fd/0'))", tmp_path, log)


def _span(name: str, tmp_path) -> tuple[float, float]:
    start, end = map(float, (tmp_path / f"{name}.stamp").read_text().split())
    return start, end


def test_stages_run_side_by_side_only_where_each_is_one_cpu_process(monkeypatch):
    assert stage_slots(1, gpu=False, cores=2) == 2
    assert stage_slots(1, gpu=False, cores=16) == 3  # the widest phase has three stages
    assert stage_slots(1, gpu=False, cores=1) == 1
    assert stage_slots(2, gpu=False, cores=16) == 1  # a 2-process launch uses the cores itself
    assert stage_slots(1, gpu=True, cores=16) == 1  # the stages would share one GPU
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_slots(1, cores=16) == 1, "found by itself"


def test_jobs_run_in_order_at_most_slots_at_once_each_into_its_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGDA_TEST_INHERITED", "inherited")
    jobs = [_stamped("long", 3.0, tmp_path), _stamped("mid", 0.6, tmp_path), _stamped("short", 0.3, tmp_path)]
    jobs[0].log.parent.mkdir()
    jobs[0].log.write_text("an earlier run's output\n" * 10)
    read_end, write_end = os.pipe()  # our stdin a pipe, as a terminal would be: no stage may read it
    saved_stdin = os.dup(0)
    os.dup2(read_end, 0)
    try:
        took = run_jobs(jobs, slots=2)
    finally:
        os.dup2(saved_stdin, 0)
        for fd in (saved_stdin, read_end, write_end):
            os.close(fd)
    long, mid, short = (_span(name, tmp_path) for name in ("long", "mid", "short"))
    assert long[0] < mid[1] and mid[0] < long[1], "the first two ran at the same time"
    assert short[0] >= mid[1] and short[0] < long[1], "the third took the first free slot, beside the first"
    assert set(took) == {"long", "mid", "short"} and took["long"] >= 3.0 and 0.3 <= took["short"] < 3.0
    for job in jobs:  # each job's own output, from its own environment over ours, reading nothing
        assert job.log.read_text() == f"working\nran as {job.name} inherited /dev/null\n"
    err = capsys.readouterr().err
    assert f"output in {jobs[0].log}" in err and "mid done in" in err and ": ran as mid" in err  # its last line


def test_one_slot_runs_them_one_after_another_on_the_terminal_without_busy_waiting(tmp_path, capfd):
    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cpu = cpu_seconds()
    took = run_jobs([_stamped("a", 1.5, tmp_path, log=False), _stamped("b", 0.0, tmp_path, log=False)], slots=1,
                    heartbeat=0.2)
    assert cpu_seconds() - cpu < 0.15, "it sleeps between polls"
    assert _span("b", tmp_path)[0] >= _span("a", tmp_path)[1]
    assert took["b"] < took["a"], "each job timed from its own start"
    assert "ran as a" in capfd.readouterr().out, "no log file: the terminal"


def test_a_failing_stage_stops_the_others_with_sigterm_and_its_error_shows_the_end_of_its_log(tmp_path):
    pid_file, stopped = tmp_path / "sleeper.pid", tmp_path / "sleeper.sigterm"
    on_sigterm = f"lambda *a: (open({str(stopped)!r}, 'w'), sys.exit(0))"
    sleeper = _python("sleeper", "import os, signal, sys, time\n"
                                 f"signal.signal(signal.SIGTERM, {on_sigterm})\n"
                                 f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                                 "time.sleep(120)", tmp_path)
    failing = _python("failing", "import os, sys, time\n"
                                 f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
                                 "print(*(f'line {i}' for i in range(40)), sep='\\n')\n"
                                 "sys.stderr.write('x: 1/9 [\\r' * 20 + '\\n')\n"
                                 "print('error: data.train names no shard', file=sys.stderr); sys.exit(3)", tmp_path)
    never = _stamped("never", 0.0, tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    started = time.perf_counter()
    with pytest.raises(SegdaError) as err:
        run_jobs([sleeper, failing, never], slots=2)
    assert signal.getsignal(signal.SIGTERM) is handler, "this process's own SIGTERM handler back"
    assert time.perf_counter() - started < 30, "the sleeper was stopped, not waited for"
    message = str(err.value)
    assert "the failing stage failed (exit 3)" in message and str(failing.log) in message
    assert "error: data.train names no shard" in message and message.count("/9 [") == 1, "the end, as shown"
    assert "line 39" in message and "line 0\n" not in message, "the end of the log, not all of it"
    assert stopped.exists(), "SIGTERM, which lets a trainer end its step, not SIGKILL"
    with pytest.raises(ProcessLookupError):  # and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert not (tmp_path / "never.stamp").exists(), "no stage starts after one failed"


def test_a_stage_killed_by_a_signal_or_preempted_is_a_failure_that_says_so(tmp_path):
    killed = _python("killed", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    with pytest.raises(SegdaError, match=r"the killed stage was killed by signal 9 \(SIGKILL: out of memory\?\)"):
        run_jobs([killed], slots=2)
    preempted = _python("preempted", "import sys; sys.exit(75)", tmp_path)  # segda's own status for a stop
    with pytest.raises(SegdaError, match=r"the preempted stage was preempted \(exit 75"):
        run_jobs([preempted], slots=2)


def test_sigterm_to_the_demo_stops_its_stages(tmp_path):
    """kill, timeout or a CI cancel: the stages must not go on writing their run folders without the demo."""
    pids = tmp_path / "pids"
    code = ("import sys, time\n"
            "from pathlib import Path\n"
            "from segda.demo_jobs import Job, run_jobs\n"
            f"tmp = Path({str(tmp_path)!r})\n"
            "sleep = \"import os, time; open(os.environ['PIDS'], 'a').write(f'{os.getpid()}\\\\n'); time.sleep(120)\"\n"
            "jobs = [Job(n, [sys.executable, '-c', sleep], {'PIDS': str(tmp / 'pids')}, tmp / f'{n}.log')\n"
            "        for n in ('a', 'b')]\n"
            "run_jobs(jobs, slots=2)\n")
    demo = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_heartbeat_shows_each_logged_stages_progress_bar(tmp_path, capsys):
    bar = _python("bar", "import sys, time; sys.stderr.write('adapt:  40%|  | 4/10 [00:01<00:02]\\r"
                         "adapt:  50%|  | 5/10 [00:01<00:02]'); sys.stderr.flush(); time.sleep(1.2)", tmp_path)
    gone = _python("gone", "import os, time; os.remove(os.environ['LOG']); time.sleep(1.2)", tmp_path)
    gone = Job(gone.name, gone.argv, {"LOG": str(gone.log)}, gone.log)
    run_jobs([bar, gone], slots=2, heartbeat=0.5)
    err = capsys.readouterr().err
    assert "bar 5/10" in err and "gone (no log)" in err


def test_bad_job_lists_are_refused():
    job = Job("a", [sys.executable, "-c", "pass"], {})
    with pytest.raises(ValueError, match="log file"):
        run_jobs([job, Job("b", job.argv, {})], slots=2)
    with pytest.raises(ValueError, match="names must differ"):
        run_jobs([job, job], slots=1)
    with pytest.raises(ValueError, match="slots"):
        run_jobs([job], slots=0)
    assert set(run_jobs([job], slots=2)) == {"a"}, "one job alone may keep the terminal"
    assert demo_jobs.MAX_SLOTS == 3
