"""`segda bench` runs each comparison side by side and ends with the ratio (tiny sizes: the numbers mean nothing)."""

from __future__ import annotations

import re

import pytest

from helpers import segda_here


@pytest.mark.slow
def test_bench_loader_train_and_shards_report_ratios(gta5_manifest, tmp_path):
    raw = gta5_manifest.parent.parent / "raw-gta5-train"
    proc = segda_here("bench", "loader", "--data", gta5_manifest, "--raw", raw, "--workers", 1, "--crop", 32,
                      "--batch", 2, "--samples", 6, "--repeats", 1, "--base-size", "160x88")
    assert re.search(r"loader speed-up .*: \d+\.\dx", proc.stdout), proc.stdout
    assert "baseline" in proc.stderr
    proc = segda_here("bench", "shards", "gta5", raw, "--repeats", 1)
    assert re.search(r"creators speed.*: [\d.]+x", proc.stdout), proc.stdout
    proc = segda_here("bench", "train", "--crop", 32, "--batch", 1, "--steps", 1, "--repeats", 1)
    assert re.search(r"train step speed-up .*: \d+\.\dx", proc.stdout), proc.stdout
    proc = segda_here("bench", "head", "--crop", 64, "--batch", 1, "--steps", 1, "--repeats", 1, "--config", "b0")
    assert re.search(r"forward\+backward, fused head vs transformers' speed-up .*: \d+\.\dx", proc.stdout), proc.stdout
    frames = sorted(raw.glob("images/*.png"))[:2]
    proc = segda_here("bench", "codec", *frames, "--repeats", 2)
    assert re.search(r"bytes: PXZ / PNG = [\d.]+x", proc.stdout) and "decode speed" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_bench_stream_simulates_ranks_against_counting_servers(tmp_path):
    proc = segda_here("bench", "stream", "--world", 4, "--workers", 2, "--train", 40, "--val", 12, "--shard-size", 8,
                      "--batch", 3, "--data-dir", tmp_path / "data")
    rows = {m.groups()[:2]: m.groups()[2:] for m in re.finditer(
        r"^\| (http|s3) \| (baseline|segda) \| ([\d.]+)x \| [\d.]+ \| ([\d.]+)x \| [\d.]+ \| (\w+), (\w+) \|",
        proc.stdout, re.M)}
    assert set(rows) == {(s, m) for s in ("http", "s3") for m in ("baseline", "segda")}, proc.stdout
    for (source, mode), (train, evaluation, once_train, once_eval) in rows.items():
        assert once_train == once_eval == "True"
        if mode == "segda":
            assert float(train) <= 1.05 and float(evaluation) <= 1.05, proc.stdout
    assert re.search(r"http: bytes fetched per byte used, training [\d.]+x -> 1\.00x", proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "selftrain"])
def test_bench_loop_times_the_real_loop_by_phase_beside_the_loader_and_the_step(tmp_path, stage):
    import json

    from helpers import segda_here

    out = tmp_path / "loop.json"
    segda_here("bench", "loop", "--stage", stage, "--crop", "64x64", "--batch", 2, "--steps", 3, "--warmup", 1,
               "--frames", 6, "--size", "160x96", "--data-dir", tmp_path / "data", "--json", out)
    r = json.loads(out.read_text())
    for field in ("data_wait_ms", "host_ms", "step_ms", "log_ms", "loop_samples_per_s", "loader_samples_per_s",
                  "step_samples_per_s"):
        assert r[field] > 0, (field, r)
    assert r["stage"] == stage and r["model"] == "tiny" and r["crop"] == [64, 64] and r["workers"] == 1
    # the verdict weighs the loop against the slower of the loader and the step
    assert r["loop_to_bound"] == pytest.approx(r["loop_samples_per_s"] / min(r["loader_samples_per_s"],
                                                                            r["step_samples_per_s"]))
    assert r["bound_by"] == ("loader" if r["loader_samples_per_s"] < r["step_samples_per_s"] else "step")
