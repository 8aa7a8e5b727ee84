"""`segda demo` end to end in CI-like conditions (the smoke size: every stage runs, the numbers mean nothing)."""

from __future__ import annotations

import json

import pytest

from helpers import segda


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_under_two_processes(tmp_path):
    from segda.demo import SMOKE, mixed_precision

    out = tmp_path / "demo"
    proc = segda("demo", "--smoke", "--processes", "2", "--out", out, timeout=600)
    report = json.loads((out / "report.json").read_text())
    pairs = {(p["model"], p["data"]) for p in report["pairs"]}
    rows = ("source", "source+colour", "source+uda-nopseudo", "source+uda", "source+lora")
    assert pairs == {(m, d) for m in rows for d in ("gta5-val", "cityscapes-val")}
    colour = {p["data"]: p for p in report["pairs"] if p["model"] == "source+colour"}
    source = {p["data"]: p for p in report["pairs"] if p["model"] == "source"}
    assert colour["cityscapes-val"]["confusion"] != source["cityscapes-val"]["confusion"], "frames were recoloured"
    extra = report["extra"]
    assert 0 < extra["adapter_bytes"] < extra["full_model_bytes"]
    assert 0 < extra["adapter_trainable_parameters"] < extra["model_parameters"]
    assert 0 < extra["uda_adapter_bytes"] < extra["full_model_bytes"]
    assert extra["processes"] == 2
    for stage in ("source", "lora", "uda", "uda-nopseudo"):
        run = json.loads((out / "runs" / stage / "run.json").read_text())
        assert run["world_size"] == 2 and run["mixed_precision"] == mixed_precision()
    uda = json.loads((out / "runs" / "uda" / "run.json").read_text())
    assert uda["config"]["adapt"]["method"] == "selftrain" and uda["replicas_identical"] is True
    nopseudo = json.loads((out / "runs" / "uda-nopseudo" / "run.json").read_text())["config"]["adapt"]
    assert nopseudo["pseudo_loss_weight"] == 0 and uda["config"]["adapt"]["pseudo_loss_weight"] == 1
    assert uda["config"]["data"]["crop_size"] == "{}x{}".format(*SMOKE.crop)
    assert uda["config"]["data"]["batch_size"] == SMOKE.uda_batch
    rows = (round(15 * SMOKE.crop[1] / 512), round(120 * SMOKE.crop[1] / 512))  # DAFormer's rows of a 512-row crop
    assert (uda["config"]["adapt"]["pseudo_ignore_top"], uda["config"]["adapt"]["pseudo_ignore_bottom"]) == rows
    target = json.loads(open(uda["config"]["data"]["target"]).read())
    assert target["dataset"] == "images" and target["labeled"] is False, "no target label reaches self-training"
    assert "| source+uda |" in proc.stdout and "| source+lora |" in proc.stdout and (out / "report.md").is_file()
