"""Hostile inputs, one test per class of defect: each checks the exit status (2), that the message names the
culprit, and that nothing the user had was lost or overwritten. Inputs are made in the tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_MODEL, cpu_env, segda, segda_here

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def fails(*args, **kw) -> str:
    """`segda ARGS` must exit 2 with a message, no traceback: in this process, or in its own with `timeout=`."""
    proc = segda(*args, check=False, **kw) if kw else segda_here(*args, check=False)
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture
def raw_gta5(tmp_path):
    from segda.shards.synth import synth_gta5

    root = tmp_path / "raw"
    synth_gta5(root, 6, size=(64, 40), quirks=False)
    return root


# ---- creators ---------------------------------------------------------------------------------------------

def _corrupt_png_body(path: Path) -> None:
    """Flip bytes inside the IDAT data and fix the chunk CRC: every checksum passes, the pixels do not decode."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4:start], "big")
    body = start + 4
    for i in range(body + 2, body + length - 4):
        data[i] ^= 0x5A
    data[body + length: body + length + 4] = zlib.crc32(bytes(data[start:body + length])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_an_image_with_valid_checksums_but_corrupt_pixels_is_not_counted(raw_gta5, tmp_path):
    from PIL import Image

    _corrupt_png_body(raw_gta5 / "images" / "00003.png")
    with Image.open(raw_gta5 / "images" / "00003.png") as im:
        im.verify()  # what the creator used to rely on: it passes
    segda_here("shards", "gta5", raw_gta5, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    assert manifest["num_samples"] == 5 and manifest["skipped"][0]["file"] == "images/00003.png"
    err = fails("shards", "gta5", raw_gta5, tmp_path / "strict", "--strict")
    assert "images/00003.png" in err and "do not decode" in err


def test_a_zero_byte_image_is_named_plainly(raw_gta5, tmp_path):
    (raw_gta5 / "images" / "00002.png").write_bytes(b"")
    err = fails("shards", "gta5", raw_gta5, tmp_path / "out", "--strict")
    assert "images/00002.png" in err and "empty (0 bytes)" in err and "0x" not in err


def test_a_fifo_where_a_label_should_be_is_skipped_not_waited_on(raw_gta5, tmp_path):
    label = raw_gta5 / "labels" / "00004.png"
    label.unlink()
    os.mkfifo(label)
    proc = segda("shards", "gta5", raw_gta5, tmp_path / "out", timeout=120)
    assert "labels/00004.png" in proc.stderr and "not a regular file" in proc.stderr
    assert json.loads((tmp_path / "out" / "train-manifest.json").read_text())["num_samples"] == 5


def test_a_rerun_after_editing_a_raw_file_rebuilds_its_shard(raw_gta5, tmp_path):
    import tarfile

    from segda.shards.synth import synth_gta5
    from segda.shards.writer import PARTS_DIR

    out = tmp_path / "out"
    label = raw_gta5 / "labels" / "00005.png"
    good_label = label.read_bytes()
    label.write_bytes(b"not a png")
    fails("shards", "gta5", raw_gta5, out, "--shard-size", 3, "--strict")  # stops in shard 1: shard 0 is done
    assert (out / PARTS_DIR / "train-000000.json").is_file()
    synth_gta5(tmp_path / "other", 1, size=(64, 40), seed=99, quirks=False)
    edited = (tmp_path / "other" / "images" / "00001.png").read_bytes()
    (raw_gta5 / "images" / "00001.png").write_bytes(edited)  # the user fixes a frame of the finished shard
    label.write_bytes(good_label)
    segda_here("shards", "gta5", raw_gta5, out, "--shard-size", 3)
    from segda import codec
    from segda.data.transforms import decode_image

    with tarfile.open(out / "train-000000.tar") as tar:
        stored = codec.decode(tar.extractfile("00001.pxz").read())
    assert np.array_equal(stored, decode_image(edited)), "the shard was rebuilt from today's files"


def test_an_all_bad_run_leaves_no_empty_shards_behind(raw_gta5, tmp_path):
    for label in (raw_gta5 / "labels").iterdir():
        label.write_bytes(b"not a png")
    err = fails("shards", "gta5", raw_gta5, tmp_path / "out")
    assert "every sample" in err
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").rglob("*.json"))


@pytest.mark.slow
def test_encoder_workers_die_with_a_killed_creator(tmp_path):
    from segda.shards.synth import synth_gta5

    synth_gta5(tmp_path / "raw", 200, size=(320, 176), quirks=False)
    proc = subprocess.Popen([sys.executable, "-m", "segda", "shards", "gta5", str(tmp_path / "raw"),
                             str(tmp_path / "out"), "--workers", "2"], env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.time() + 60
    while len(children) < 2 and time.time() < deadline and proc.poll() is None:
        children = _children(proc.pid)
        time.sleep(0.05)
    assert len(children) >= 2, "the encoder pool did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(c) for c in children), "encoder workers outlived their creator"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---- every command: outputs, arguments --------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["synth", "gta5", "{out}"], ["shards", "gta5", "{raw}", "{out}"],
    ["pretrain", str(DEMO / "pretrain.yaml"), "--out", "{out}"], ["evaluate", "--model", "m", "--data", "d",
                                                                  "--out", "{out}"],
    ["predict", "m", "x.png", "--out", "{out}"], ["export", "a", "--out", "{out}"], ["demo", "--out", "{out}"],
])
def test_an_output_that_is_an_existing_file_is_refused_and_kept(command, tmp_path):
    out = tmp_path / "precious.txt"
    out.write_text("keep me")
    err = fails(*[c.format(out=out, raw=tmp_path) for c in command])
    assert str(out) in err and "existing file" in err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("flag,value", [("--workers", "-3"), ("--quality", "500"), ("--workers", "two")])
def test_out_of_range_creator_arguments_are_refused(flag, value, raw_gta5, tmp_path):
    proc = segda_here("shards", "gta5", raw_gta5, tmp_path / "out", flag, value, check=False)
    assert proc.returncode == 2 and flag in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_never_overwrites_one_result_with_another(tmp_path):
    import cv2
    import numpy as np

    from segda.model import build_model, save_model

    model = tmp_path / "model"
    save_model(build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64}), model)
    for folder, value in (("a", 40), ("b", 200)):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "frame.png"), np.full((32, 48, 3), value, np.uint8))
    segda_here("predict", model, tmp_path / "a" / "frame.png", tmp_path / "b" / "frame.png",
               "--out", tmp_path / "masks", "--eval-size", "48x32")
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == [
        "a__frame.png", "a__frame_overlay.png", "b__frame.png", "b__frame_overlay.png"]
    err = fails("predict", model, tmp_path / "a" / "frame.png", tmp_path / "a" / "frame.png", "--out", tmp_path / "m2")
    assert "given twice" in err


def test_synth_refuses_a_folder_that_holds_frames(raw_gta5):
    before = sorted((raw_gta5 / "images").iterdir())
    stamps = [p.stat().st_mtime_ns for p in before]
    err = fails("synth", "gta5", raw_gta5, "--num", "2")
    assert str(raw_gta5 / "images") in err and "already holds frames" in err
    assert [p.stat().st_mtime_ns for p in sorted((raw_gta5 / "images").iterdir())] == stamps


# ---- weights --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from segda.model import build_model, save_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64}), out)
    return out


@pytest.mark.slow
def test_corrupt_or_truncated_model_weights_are_named(tiny_model, tmp_path, cityscapes_manifest):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = fails("evaluate", "--model", broken, "--data", cityscapes_manifest, "--out", tmp_path / "report",
                "--eval-size", "160x80")
    assert str(broken) in err and "corrupt or truncated" in err


@pytest.mark.slow
def test_a_bin_only_model_is_refused_as_pickle_not_sent_to_the_network(tiny_model, tmp_path, cityscapes_manifest):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    err = fails("evaluate", "--model", folder, "--data", cityscapes_manifest, "--out", tmp_path / "r")
    assert "safetensors only" in err and "network" not in err


@pytest.mark.slow
def test_an_adapter_folder_missing_its_config_is_called_an_adapter(tmp_path, cityscapes_manifest):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "segda.json").write_text("{}")
    err = fails("evaluate", "--model", folder, "--data", cityscapes_manifest, "--out", tmp_path / "r")
    assert "adapter_config.json" in err and "config.json: give" not in err


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_a_failed_run_says_so(tmp_path, gta5_manifest):
    run = tmp_path / "run"
    args = ["pretrain", DEMO / "pretrain.yaml", "--out", run, "--max-steps", 4, "--set", f"data.train={gta5_manifest}",
            "data.batch_size=2", "data.workers=0", "data.crop_size=32x32", "data.base_size=160x88",
            "train.checkpoint_every=2", TINY_MODEL]
    segda_here(*args)
    optimizer = run / "checkpoints" / "step-000002" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    # The same settings would find a finished run with nothing to do; a longer run resumes from its checkpoint.
    err = fails(*[6 if a == 4 else a for a in args], "--resume", "auto")
    assert "step-000002" in err and "damaged" in err


@pytest.mark.slow
def test_a_full_disk_is_named_and_run_json_does_not_say_running(tmp_path, gta5_manifest):
    """RLIMIT_FSIZE makes every write past 200 kB fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "segda", "pretrain", str(DEMO / "pretrain.yaml"), "--out", str(run),
                           "--max-steps", "2", "--set", f"data.train={gta5_manifest}", "data.batch_size=2",
                           "data.workers=0", "data.crop_size=32x32", "data.base_size=160x88",
                           "train.checkpoint_every=0"], env=cpu_env(), capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot write" in proc.stderr and "free some space" in proc.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "model").exists() and not list(run.glob("*segda-tmp*")), "nothing half-written left"


# ---- streaming ------------------------------------------------------------------------------------------

def test_a_stalled_server_is_announced_and_its_timeout_can_be_set(tmp_path, http_server, capfd):
    from servers import Faults

    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.eval_stream import eval_loader
    from segda.log import SegdaError

    (http_server.root / "a.tar").write_bytes(b"\0" * 200_000)
    http_server.faults = Faults(drop_after=100, stall=3.0)
    ds = resolve_dataset(f"{http_server.url}/a.tar")
    cfg = DataConfig(workers=0, timeout=0.5, retries=2)
    start = time.monotonic()
    list(eval_loader(ds, cfg, rank=0, world=1))  # the server stalls once: the retry reads the rest
    assert time.monotonic() - start < 2.5, "data.timeout (0.5 s), not the server's 3 s stall, bounds the wait"
    err = capfd.readouterr().err
    assert "a.tar" in err and "retrying in" in err and "attempt 2 of 2" in err, "each retry is announced"
    http_server.faults = Faults(drop_after=100, stall=3.0, only=None)
    http_server.faults._done.clear()
    cfg = DataConfig(workers=0, timeout=0.5, retries=1)
    with pytest.raises(SegdaError, match=r"giving up on .*a\.tar after 1 attempts"):
        list(eval_loader(ds, cfg, rank=0, world=1))


@pytest.mark.slow
def test_an_error_inside_a_loader_worker_prints_its_message_not_a_traceback(tmp_path, cityscapes_manifest):
    manifest = tmp_path / "m.json"
    data = json.loads(Path(cityscapes_manifest).read_text())
    data["shards"][0]["url"] = str(Path(cityscapes_manifest).parent / "missing.tar")
    manifest.write_text(json.dumps(data))
    model = tmp_path / "model"
    from segda.model import build_model, save_model

    save_model(build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64}), model)
    err = fails("evaluate", "--model", model, "--data", manifest, "--out", tmp_path / "r", "--workers", "1",
                "--eval-size", "160x80")
    assert err.strip().splitlines()[-1].startswith("segda: error:") and "missing.tar" in err.strip().splitlines()[-1]
    assert "Original Traceback" not in err


@pytest.mark.slow
def test_a_truncated_adapter_is_named(tiny_model, tmp_path, cityscapes_manifest):
    from segda.adapters import attach_lora, save_adapter
    from segda.config import LoraConfig
    from segda.model import build_model, fingerprint

    base = build_model(str(tiny_model))
    base_fp = fingerprint(base)
    adapter = tmp_path / "adapter"
    save_adapter(attach_lora(base, LoraConfig()), adapter, base=str(tiny_model), base_fingerprint=base_fp, config={})
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    err = fails("evaluate", "--model", adapter, "--data", cityscapes_manifest, "--out", tmp_path / "r",
                "--eval-size", "160x80")
    assert "adapter_model.safetensors" in err and "corrupt or truncated" in err


def test_a_disk_filling_up_while_writing_shards_is_named_and_leaves_no_partial_shard(raw_gta5, tmp_path):
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "segda", "shards", "gta5", str(raw_gta5), str(out)], env=cpu_env(),
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot write" in proc.stderr and "free some space" in proc.stderr
    assert not list(out.glob("*.tar")) and not (out / "train-manifest.json").exists()


@pytest.mark.slow
def test_predict_never_replaces_an_input_and_never_waits_on_a_fifo(tiny_model, tmp_path):
    import cv2
    import numpy as np

    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "frame.png"), np.full((32, 48, 3), 90, np.uint8))
    before = (photos / "frame.png").read_bytes()
    err = fails("predict", tiny_model, photos / "frame.png", "--out", photos, "--eval-size", "48x32")
    assert "would replace an input image" in err and (photos / "frame.png").read_bytes() == before
    os.mkfifo(photos / "fifo.png")
    err = fails("predict", tiny_model, photos / "fifo.png", "--out", tmp_path / "o", timeout=60)
    assert "fifo.png is not a regular image file" in err


@pytest.mark.slow
def test_file_system_errors_name_the_path_and_index_validates_the_manifest(raw_gta5, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    err = fails("shards", "gta5", raw_gta5, precious / "sub")
    assert "precious.txt" in err and precious.read_text() == "keep me"
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"shards": [1]}))
    err = fails("index", manifest)
    assert "shards[0] is int" in err
    manifest.write_text(json.dumps({"shards": [{"url": "a.tar", "num_samples": "6"}]}))
    assert "shards[0].num_samples is '6'" in fails("index", manifest)
