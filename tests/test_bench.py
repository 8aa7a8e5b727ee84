"""`segda bench` runs each comparison side by side and ends with the ratio (tiny sizes: the numbers mean nothing)."""

from __future__ import annotations

import re

import pytest

from helpers import segda


@pytest.mark.slow
def test_bench_loader_train_and_shards_report_ratios(gta5_manifest, tmp_path):
    raw = gta5_manifest.parent.parent / "raw-gta5-train"
    proc = segda("bench", "loader", "--data", gta5_manifest, "--raw", raw, "--workers", 1, "--crop", 32,
                 "--batch", 2, "--samples", 6, "--repeats", 1, "--base-size", "160x88")
    assert re.search(r"loader speed-up .*: \d+\.\dx", proc.stdout), proc.stdout
    assert "baseline" in proc.stderr
    proc = segda("bench", "shards", "gta5", raw, "--repeats", 1)
    assert re.search(r"creators speed.*: [\d.]+x", proc.stdout), proc.stdout
    proc = segda("bench", "train", "--crop", 32, "--batch", 1, "--steps", 1, "--repeats", 1)
    assert re.search(r"train step speed-up .*: \d+\.\dx", proc.stdout), proc.stdout
