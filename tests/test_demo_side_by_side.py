"""`segda demo` as most users run it: one process per stage, the stages side by side on a CPU (segda.demo_jobs).
Its own file, so that xdist can run it beside the other smoke demo (tests/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from helpers import segda_here


@pytest.mark.slow
def test_demo_smoke_with_one_process_per_stage_runs_them_side_by_side_with_the_oracle(tmp_path):
    """The default `segda demo` on a CPU: the stages side by side (segda.demo_jobs), each into its own log."""
    import os

    import torch

    out = tmp_path / "demo"
    proc = segda_here("demo", "--smoke", "--oracle", "--out", out)
    report = json.loads((out / "report.json").read_text())
    rows = ("source", "source+colour", "source+uda-nopseudo", "source+uda", "source+lora", "target")
    assert {(p["model"], p["data"]) for p in report["pairs"]} == {(m, d) for m in rows
                                                                   for d in ("gta5-val", "cityscapes-val")}
    extra, slots = report["extra"], 1 if torch.cuda.is_available() else min(3, len(os.sched_getaffinity(0)))
    assert extra["processes"] == 1 and extra["stages_side_by_side"] == slots
    stages = {"source": "pretrain_s", "target": "oracle_s", "lora": "adapt_s", "uda": "uda_s",
              "uda-nopseudo": "uda_nopseudo_s"}
    for stage, key in stages.items():
        run = json.loads((out / "runs" / stage / "run.json").read_text())
        assert run["status"] == "done" and run["world_size"] == 1 and extra[key] > 0
        if slots > 1:  # each stage's own output, its tqdm bar at the last step included
            log = (out / "logs" / f"{stage}.log").read_text()
            assert f"{run['step']}/{run['step']} [" in log and f"saved {out / 'runs' / stage}" in log
            assert f"{stage} done in" in proc.stderr
    if slots > 1:  # they overlapped: the phase took less than its stages' own times added up
        assert extra["adapt_wall_s"] < extra["uda_s"] + extra["uda_nopseudo_s"] + extra["adapt_s"]
    assert "| source+uda |" in proc.stdout and "| target |" in proc.stdout
