"""`segda demo` end to end in CI-like conditions (the smoke size: every stage runs, the numbers mean nothing)."""

from __future__ import annotations

import json

import pytest

from helpers import segda_here


def test_the_demo_trains_in_fp32_on_every_cpu():
    """At the demo's sizes bf16 autocast is slower than fp32 even on a CPU with native bf16 (README, `segda demo`),
    and one precision gives every CPU the same matrix."""
    import torch

    from segda.demo import mixed_precision

    assert mixed_precision(cpu=True) == "no"
    assert mixed_precision() == ("bf16" if torch.cuda.is_available() else "no")


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_under_two_processes(tmp_path):
    from segda.demo import SMOKE, mixed_precision

    out = tmp_path / "demo"
    proc = segda_here("demo", "--smoke", "--processes", "2", "--out", out)  # its stages: 2-process launches
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
        assert run["world_size"] == 2 and run["mixed_precision"] == mixed_precision(cpu=True) == "no"
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


def test_summarize_gives_each_rows_mean_and_standard_error_over_the_studies(tmp_path, capsys):
    """Two studies written as `segda demo` writes report.json; the table's figures checked by hand."""
    from segda.classes import CLASS_NAMES

    def study(name, seed, target_miou, road):
        pairs = [{"model": m, "data": d, "miou": (target_miou[m] if d == "cityscapes-val" else 0.5),
                  "iou": {c: (road[m] if c == "road" else 0.0) for c in CLASS_NAMES}}
                 for m in target_miou for d in ("gta5-val", "cityscapes-val")]
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(
            {"pairs": pairs, "class_names": list(CLASS_NAMES), "extra": {"seed": seed}}))

    rows = ("source", "source+uda-nopseudo", "source+uda", "source+lora")
    study("a", 0, dict(zip(rows, (0.10, 0.14, 0.16, 0.30))), dict(zip(rows, (0.2, 0.3, 0.5, 0.9))))
    study("b", 1, dict(zip(rows, (0.12, 0.15, 0.20, 0.32))), dict(zip(rows, (0.2, 0.3, 0.4, 0.9))))
    from segda.cli import main

    def summarize(*folders):  # in-process: the command line as a user types it, without a new interpreter
        code = main(["demo", "--summarize", *map(str, folders)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    _, out, _ = summarize(tmp_path / "a", tmp_path / "b")
    assert "over 2 studies (seeds 0, 1)" in out
    assert "| source+uda | 50.0 ± 0.0 | 18.0 ± 2.0 | 35 ± 5 % |" in out  # shares 6/20 and 8/20
    assert "| road | 15.0 ± 5.0 | 25.0 ± 5.0 |" in out  # pseudo-labels 20 and 10; self-training 30 and 20
    # a class no model saw nor predicted has no IoU (None in report.json); a study whose adapter gained nothing
    (tmp_path / "a" / "report.json").write_text((tmp_path / "a" / "report.json").read_text().replace(
        '"sky": 0.0', '"sky": null'))
    study("c", 2, dict(zip(rows, (0.10, 0.14, 0.16, 0.10))), dict(zip(rows, (0.2, 0.3, 0.5, 0.9))))
    _, out, _ = summarize(tmp_path / "a", tmp_path / "c")
    assert "| sky | 0.0 | 0.0 |" in out, out  # study a has no sky IoU: one value left, no ±
    assert "| source+uda | 50.0 ± 0.0 | 16.0 ± 0.0 | 30 % |" in out, out  # study c's share is undefined
    code, _, err = summarize(tmp_path / "a", tmp_path / "nothing")
    assert code == 2 and "nothing/report.json" in err and "segda demo" in err
