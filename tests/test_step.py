"""The training step and the evaluation update on the hot path: no host-device sync per micro-batch, a non-finite
gradient skipped on the device, the loss and the data-wait share reported at log lines, torch.compile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY_MODEL, SyncCounter

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"

def _config(manifest, *extra):
    from segda.config import load_config

    return load_config(DEMO / "pretrain.yaml", [
        f"data.train={manifest}", "data.batch_size=2", "data.workers=1", "data.crop_size=64x64",
        "data.base_size=160x88", "train.checkpoint_every=0", "optim.warmup_steps=0", TINY_MODEL,
        *extra])


def _syncs_of_a_run(tmp_path, manifest, steps: int) -> list[str]:
    from segda.train import train

    counter = SyncCounter()
    with counter:
        train("pretrain", _config(manifest, f"train.max_steps={steps}", f"train.log_every={steps}"), tmp_path / str(steps))
    return counter.calls


def test_the_training_step_does_not_wait_for_the_device(tmp_path, gta5_manifest):
    """Syncs happen per log line, checkpoint and run, never per micro-batch: 3 and 9 steps sync equally often.
    (Before: a gather + bool(isfinite) before backward and a float(loss) after, per micro-batch.)"""
    short = _syncs_of_a_run(tmp_path, gta5_manifest, 3)
    long = _syncs_of_a_run(tmp_path, gta5_manifest, 9)
    assert len(long) == len(short), f"syncs grow with the steps: {len(short)} for 3 steps, {len(long)} for 9: {long}"
    run = json.loads((tmp_path / "9" / "run.json").read_text())
    assert run["step"] == 9 and run["status"] == "done"


def test_evaluation_counts_a_frame_without_a_sync_and_exactly():
    from segda.evaluate import confusion_update

    torch.manual_seed(0)
    label = torch.randint(0, 19, (37, 53), dtype=torch.uint8)
    label[torch.rand(37, 53) < 0.3] = 255
    pred = torch.randint(0, 19, (37, 53))
    confusion = torch.zeros(19, 19, dtype=torch.int64)
    with SyncCounter() as counter:
        confusion_update(confusion, pred, label)
    assert counter.calls == []
    expected = torch.zeros(19, 19, dtype=torch.int64)
    for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    assert torch.equal(confusion, expected) and int(confusion.sum()) == int((label != 255).sum())


def test_the_guard_skips_a_non_finite_step_on_the_device_and_counts_it():
    from segda.train.guard import NonFiniteGuard

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = NonFiniteGuard(optimizer, "cpu")
    for grad in ([1.0, 1, 1, 1], [float("nan"), 1, 1, 1], [1.0, float("inf"), 1, 1]):
        weight.grad = torch.tensor(grad)
        guard.arm([weight])
        before = (weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()})
        optimizer.step()
        guard.disarm()
        if all(map(torch.isfinite, torch.tensor(grad))):
            assert not torch.equal(weight.detach(), before[0])
        else:  # weights, moments and the step count untouched
            assert torch.equal(weight.detach(), before[0])
            assert all(torch.equal(optimizer.state[weight][k], v) for k, v in before[1].items())
    assert guard.new_skips() == 2 and guard.new_skips() == 0
    assert float(optimizer.state[weight]["step"]) == 1
    # BatchNorm statistics, updated by the forward pass before any verdict, are put back when the step is skipped
    norm = torch.nn.BatchNorm1d(2)
    guard = NonFiniteGuard(torch.optim.AdamW(norm.parameters(), fused=True), "cpu", norm)
    guard.start_step()  # once, as the loop does: each step's arm() keeps the snapshot for the next
    for batch, skipped in (([[1.0, 2.0], [3.0, 4.0]], False), ([[float("nan"), 2.0], [3.0, 4.0]], True)):
        before = norm.running_mean.clone()
        norm(torch.tensor(batch)).sum().backward()
        guard.arm(norm.parameters())
        assert torch.equal(norm.running_mean, before) == skipped and torch.isfinite(norm.running_mean).all()
        norm.zero_grad()
    with pytest.raises(ValueError, match="fused"):
        NonFiniteGuard(torch.optim.AdamW([weight], fused=False), "cpu")


def test_log_lines_report_the_loss_and_the_data_wait(tmp_path, gta5_manifest):
    from segda.train import train

    summary = train("pretrain", _config(gta5_manifest, "train.max_steps=4", "train.log_every=2"), tmp_path / "r")
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert 2.0 < lines[0]["loss"] < 4.0  # the mean of its micro-batches near ln(19) = 2.94, not their sum
    for line in lines:
        assert 0 < line["loss"] < 10 and 0 <= line["data_wait_share"] <= 1 and line["data_wait_s"] >= 0
    assert summary["data_wait_seconds"] == pytest.approx(sum(line["data_wait_s"] for line in lines))
    assert 0 < summary["data_wait_share"] < 1


def test_a_loader_slowed_on_purpose_shows_as_a_high_data_wait_share(tmp_path, gta5_manifest, http_server):
    """Shards behind a store that answers each read 0.5 s late: the trainer spends most of its time waiting, and
    the logged share and the run's summary say so (a share measured in the wrong place would read near 0)."""
    import shutil

    from servers import Faults

    from segda.train import train

    for f in gta5_manifest.parent.iterdir():
        shutil.copy(f, http_server.root / f.name)
    http_server.faults = Faults(delay=0.5)
    cfg = _config(f"{http_server.url}/{gta5_manifest.name}", "train.max_steps=6", "train.log_every=3")
    summary = train("pretrain", cfg, tmp_path / "slow")
    lines = [json.loads(line) for line in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert all(0.5 <= line["data_wait_share"] <= 1 for line in lines), lines
    assert 0.5 <= summary["data_wait_share"] <= 1, summary
    # no more wait than the store's own delays could cause (a wait counted twice, or the host work counted in it)
    assert summary["data_wait_seconds"] <= 0.5 * len(http_server.faults.requests), summary


def test_channels_last_trains_in_that_memory_format(tmp_path, gta5_manifest, monkeypatch):
    import segda.train as segda_train
    import segda.train.setup as setup
    from segda.model import normalize

    seen = []

    def spy(*args, **kwargs):
        pixels = normalize(*args, **kwargs)
        seen.append(pixels.is_contiguous(memory_format=torch.channels_last))
        return pixels

    monkeypatch.setattr(setup, "normalize", spy)
    segda_train.train("pretrain", _config(gta5_manifest, "train.max_steps=2", "train.channels_last=true"),
                      tmp_path / "r")
    assert seen and all(seen)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_compile_trains_the_same_model(tmp_path, gta5_manifest):
    """train.compile goes through dynamo and AOTAutograd (aot_eager: no C++ build in the test) to the same weights."""
    from safetensors.torch import load_file

    from segda.train import train

    train("pretrain", _config(gta5_manifest, "train.max_steps=2", "train.log_every=1"), tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train("pretrain", _config(gta5_manifest, "train.max_steps=2", "train.log_every=1", "train.compile=true",
                              "train.compile_backend=aot_eager"), tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    eager, compiled = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    diffs = torch.cat([(eager[k].double() - compiled[k].double()).abs().flatten() for k in eager])
    # Adam turns float-rounding differences of near-zero gradients into whole steps for a few weights: compare the
    # bulk, and the losses.
    assert float(diffs.quantile(0.99)) < 1e-5, f"compiled training drifted: {float(diffs.quantile(0.99))}"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
