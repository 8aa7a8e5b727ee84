"""Hardening, second round: a run folder has one owner, no silent wrong result, and no small hostile input costs
minutes or gigabytes. Each test is one reproduction: exit 2 with a message naming the thing at fault (or the right
result), nothing the user had overwritten, and a time bound where the input was built to stall."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_MODEL, cpu_env, segda_here

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def refused(*args) -> str:
    ran = segda_here(*args, check=False)
    assert ran.returncode == 2, f"expected exit 2, got {ran.returncode}:\n{ran.stderr[-3000:]}"
    assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
    return ran.stderr


def pretrain_args(manifest, out, *sets) -> list:
    return ["pretrain", DEMO / "pretrain.yaml", "--out", out, "--set", f"data.train={manifest}", "data.workers=0",
            "data.batch_size=2", "data.crop_size=64x64", "data.base_size=160x88", TINY_MODEL, *sets]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".segda-lock"}


# ---- A. a run folder has one owner ---------------------------------------------------------------------------

def test_a_finished_run_is_never_replaced_and_overwrite_moves_it_aside(gta5_manifest, tmp_path):
    out = tmp_path / "p0"
    segda_here(*pretrain_args(gta5_manifest, out, "train.max_steps=2", "train.checkpoint_every=0"))
    before = snapshot(out)
    err = refused(*pretrain_args(gta5_manifest, out, "train.max_steps=1", "train.seed=5"))
    assert f"{out} already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert snapshot(out) == before, "nothing of the finished run was touched"
    ran = segda_here(*pretrain_args(gta5_manifest, out, "train.max_steps=2"), "--resume", "auto")
    assert "nothing to resume" in ran.stderr and snapshot(out) == before
    ran = segda_here(*pretrain_args(gta5_manifest, out, "train.max_steps=1"), "--resume", "auto")  # fewer steps
    assert "nothing to resume" in ran.stderr and snapshot(out) == before
    err = refused(*pretrain_args(gta5_manifest, out, "train.max_steps=2", "train.seed=5"), "--resume", "auto")
    assert "train.seed was 0" in err and snapshot(out) == before
    err = refused("adapt", DEMO / "adapt.yaml", "--out", out, "--resume", "auto", "--set",
                  f"data.train={gta5_manifest}", f"model.name_or_path={out / 'model'}")
    assert "resume it with `segda pretrain`" in err and snapshot(out) == before
    # a longer run asked of a finished run without checkpoints would start from scratch over it: refused
    err = refused(*pretrain_args(gta5_manifest, out, "train.max_steps=3", "train.checkpoint_every=0"), "--resume", "auto")
    assert "no checkpoint to continue" in err and snapshot(out) == before
    # a requeued job resuming a finished adapter whose base was since removed: nothing to do, not an error
    base, adapted = tmp_path / "base", tmp_path / "a0"
    shutil.copytree(out / "model", base)
    adapt = ["adapt", DEMO / "adapt.yaml", "--out", adapted, "--set", f"data.train={gta5_manifest}",
             "data.workers=0", "data.batch_size=2", "data.crop_size=64x64", "data.base_size=160x88",
             "train.max_steps=1", f"model.name_or_path={base}"]
    segda_here(*adapt)
    shutil.rmtree(base)
    assert "nothing to resume" in segda_here(*adapt, "--resume", "auto").stderr
    assert "no checkpoint to continue" in refused(*adapt, "--resume", "auto", "--max-steps", 2)
    segda_here(*pretrain_args(gta5_manifest, out, "train.max_steps=1", "train.seed=5"), "--overwrite")
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("p0.old-")]
    assert snapshot(aside) == before, "moved aside whole, never deleted"
    assert json.loads((out / "run.json").read_text())["step"] == 1


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another segda process that owns `folder` until killed."""
    code = ("import sys, time; from segda.rundir import Owner; from pathlib import Path; "
            "Owner(Path(sys.argv[1]), 'pretrain').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=cpu_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_on_a_folder_in_use_is_refused_and_a_dead_owner_leaves_no_lock(gta5_manifest, tmp_path):
    out = tmp_path / "busy"
    holder = _hold_lock(out)
    try:
        for flags in ([], ["--resume", "auto"], ["--overwrite"]):
            err = refused(*pretrain_args(gta5_manifest, out, "train.max_steps=1"), *flags)
            assert f"{out} is being written by segda pretrain (process {holder.pid}" in err, err
    finally:
        holder.kill()  # kill -9: the kernel drops its lock with it
        holder.wait()
    segda_here(*pretrain_args(gta5_manifest, out, "train.max_steps=1"), "--resume", "auto")
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_the_lock_goes_with_its_owner_not_with_the_workers_it_forked(tmp_path):
    """A trainer killed with -9 leaves DataLoader workers behind for a while; they must not keep its folder."""
    code = ("import os, sys, time; from segda.rundir import Owner; from pathlib import Path; "
            "Owner(Path(sys.argv[1]), 'pretrain').acquire(); child = os.fork(); "
            "print('held', child or os.getpid(), flush=True) if child else None; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=cpu_env())
    from segda.log import SegdaError
    from segda.rundir import Owner

    _, worker = proc.stdout.readline().split()
    try:
        with pytest.raises(SegdaError, match="being written by segda pretrain"):
            Owner(tmp_path, "adapt").acquire()
        proc.kill()
        proc.wait()
        os.kill(int(worker), 0)  # the forked worker still lives
        Owner(tmp_path, "adapt").acquire().release()  # and the folder is free at once
    finally:
        os.kill(int(worker), signal.SIGKILL)
    # A POSIX lock never refuses its own process: a second claim from it is refused by segda itself.
    held = Owner(tmp_path, "adapt").acquire()
    with pytest.raises(SegdaError, match="already being written by this process"):
        Owner(tmp_path, "pretrain").acquire()
    held.release()


def test_demo_refuses_a_folder_that_holds_a_study(tmp_path):
    study = tmp_path / "d1"
    (study / "runs").mkdir(parents=True)
    (study / "report.json").write_text("{}")
    started = time.perf_counter()
    err = refused("demo", "--out", study, "--seed", 1)
    assert f"{study} already holds a run" in err and "--overwrite" in err
    assert time.perf_counter() - started < 10, "refused before any work"
    assert (study / "report.json").read_text() == "{}"
    logs = tmp_path / "mine" / "logs"  # a folder of the user's with logs/ in it: the demo's stage logs would empty them
    logs.mkdir(parents=True)
    (logs / "source.log").write_text("my notes")
    assert "already holds a run (logs)" in refused("demo", "--out", logs.parent, "--seed", 1)
    assert (logs / "source.log").read_text() == "my notes"


# ---- B. silent wrong results ---------------------------------------------------------------------------------

def _exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=100, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("image_format", ["pxz", "keep"])
def test_exif_orientation_is_applied_by_the_creator_the_loader_and_predict_alike(tmp_path, image_format):
    """A camera JPEG stored sideways (128x64) with Orientation=6 is a 64x128 upright frame: its 64x128 label fits,
    the shard holds upright pixels, and predict's mask is 64x128 too."""
    import cv2

    from segda.data.datasets import resolve_dataset
    from segda.data.eval_stream import eval_loader
    from segda.config import DataConfig
    from segda.data.transforms import decode_image

    stored = np.zeros((64, 128, 3), np.uint8)
    stored[:, :16] = 255  # a bright band on the stored image's left: on the upright frame's top
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "images" / "a.jpg").write_bytes(_exif_jpeg(stored, 6))
    cv2.imwrite(str(root / "labels" / "a.png"), np.zeros((128, 64), np.uint8))
    (tmp_path / "ids.yaml").write_text("ids: {0: 0}\n")
    segda_here("shards", "folder", root, tmp_path / "shards", "--id-map", tmp_path / "ids.yaml", "--image-format",
               image_format)
    ds = resolve_dataset(str(tmp_path / "shards" / "train-manifest.json"))
    (batch,) = list(eval_loader(ds, DataConfig(workers=0), rank=0, world=1))
    image, label = batch["image"][0].numpy(), batch["label"][0].numpy()
    assert image.shape[:2] == label.shape == (128, 64), "one orientation for image and label"
    assert image[:16].mean() > 200 and image[-16:].mean() < 50, "upright: the band on top"
    assert np.array_equal(image, decode_image((root / "images" / "a.jpg").read_bytes())), "as the loader decodes it"
    model = tmp_path / "model"
    _tiny_model(model)
    segda_here("predict", model, root / "images" / "a.jpg", "--out", tmp_path / "masks", "--eval-size", "64x128")
    assert cv2.imread(str(tmp_path / "masks" / "a.png"), cv2.IMREAD_UNCHANGED).shape == (128, 64)


def _tiny_model(out: Path) -> Path:
    from segda.model import build_model, save_model

    save_model(build_model("", {"hidden_sizes": [16, 32, 64, 128], "decoder_hidden_size": 64}), out)
    return out


@pytest.mark.parametrize("key,value", [("model.name_or_path", "runs/other/model"), ("lora.r", 4),
                                       ("lora.head", "full"), ("model.config", {"hidden_sizes": [8, 16, 32, 64]})])
def test_resume_refuses_another_model_naming_the_key(tmp_path, key, value):
    from segda.config import load_config
    from segda.log import SegdaError
    from segda.resume import check_base, check_resumable

    stage = "pretrain" if key == "model.config" else "adapt"
    base = ["model.name_or_path="] if stage == "pretrain" else ["model.name_or_path=runs/base/model"]
    cfg = load_config(None, base)
    saved = {"stage": stage, "step": 2, "world_size": 1, "config": cfg.to_dict()}
    check_resumable(saved, load_config(None, base), stage, tmp_path, world=1)
    changed = load_config(None, [*base, f"{key}={value if isinstance(value, str) else json.dumps(value)}"])
    with pytest.raises(SegdaError, match=f"{key} was .*the checkpoint holds the weights of that model"):
        check_resumable(saved, changed, stage, tmp_path, world=1)
    check_base({"base_fingerprint": "abc"}, "abc", tmp_path)
    with pytest.raises(SegdaError, match="base model at model.name_or_path changed"):
        check_base({"base_fingerprint": "abc"}, "def", tmp_path)


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_named(tmp_path):
    """The config's architecture keys match, but the code that wrote the checkpoint built other layers (e.g. LoRA
    targets that reached the head before they were anchored in the encoder): a named error, not a torch traceback."""
    import torch

    from segda.log import SegdaError
    from segda.train.checkpointer import _write_tensor_part, load_tensor_part
    from segda.train.setup import _Module

    written = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    _write_tensor_part(tmp_path, "model", written.state_dict())
    same = _Module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))
    load_tensor_part(same, tmp_path, "model")
    assert torch.equal(same.module[1].weight, written[1].weight)
    for other in (torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Sequential(torch.nn.Linear(4, 4),
                                                                                   torch.nn.Linear(4, 3))):
        with pytest.raises(SegdaError, match=rf"checkpoint {tmp_path}: its model tensors do not fit .* new run folder"):
            load_tensor_part(_Module(other), tmp_path, "model")


def test_sliding_windows_must_cover_every_pixel_and_be_big_enough_for_segformer():
    from segda.evaluate import InferenceOptions
    from segda.log import SegdaError

    with pytest.raises(SegdaError, match="stride 96x96 is longer than --crop 32x32"):
        InferenceOptions(mode="slide", crop=(32, 32), stride=(96, 96))
    with pytest.raises(SegdaError, match="at least 32x32"):
        InferenceOptions(mode="slide", crop=(16, 16), stride=(8, 8))
    InferenceOptions(mode="slide", crop=(32, 32), stride=(32, 32))


def test_a_manifest_listing_a_shard_or_a_sample_twice_is_refused(cityscapes_manifest, tmp_path):
    from segda.data.datasets import resolve_dataset
    from segda.log import SegdaError

    data = json.loads(cityscapes_manifest.read_text())
    for shard in data["shards"]:
        shard["url"] = str(cityscapes_manifest.parent / shard["url"])
    twice = {**data, "shards": data["shards"] + data["shards"][:1]}
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(SegdaError, match="lists the shard .*val-000000.tar more than once"):
        resolve_dataset(str(tmp_path / "twice.json"))
    key = data["shards"][1]["samples"][0][0]
    data["shards"][0]["samples"][0][0] = key
    (tmp_path / "key.json").write_text(json.dumps(data))
    with pytest.raises(SegdaError, match=f"lists the sample '{key}' more than once"):
        resolve_dataset(str(tmp_path / "key.json"))


# ---- C. untrusted bytes cost bounded work --------------------------------------------------------------------

def test_a_pxz_header_declaring_a_huge_narrow_image_is_refused_at_once():
    from segda import codec

    head = codec.MAGIC + struct.pack("<IIBBHI", 1 << 28, 1, 1, codec.UP, 65535, (1 << 28) // 65535 + 1)
    started = time.process_time()
    with pytest.raises(codec.PxzError, match="inconsistent"):
        codec.decode(head + b"\0" * 94_000)
    assert time.process_time() - started < 1
    tall = np.random.default_rng(0).integers(0, 255, (60_000, 2, 3), dtype=np.uint8)  # legal, and narrow
    started = time.process_time()
    assert np.array_equal(codec.decode(codec.encode(tall)), tall)
    assert time.process_time() - started < 10, "narrow strips undo the Up filter column-wise, not row by row"


def _huge_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid PNG header (and a first row) declaring width x height: a few hundred bytes on disk."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\0" * (width + 1) * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _peak_rss_of(code: str, *args) -> tuple[int, str]:
    """Run `code` in a fresh interpreter; its peak resident memory in bytes, and its stderr."""
    wrapper = code + "\nimport resource, sys; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stdout)"
    proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True,
                          env=cpu_env(), timeout=120)
    return int(proc.stdout.split()[-1]) * 1024, proc.stderr


@pytest.mark.slow
def test_a_small_png_declaring_20000x20000_pixels_is_refused_before_it_is_decoded(tmp_path):
    from segda.data.transforms import DecodeError, decode_label

    png = _huge_png(tmp_path / "huge.png")
    assert png.stat().st_size < 400_000
    with pytest.raises(DecodeError, match="20000x20000"):
        decode_label(png.read_bytes())  # as a shard's label
    model = _tiny_model(tmp_path / "model")
    peak, err = _peak_rss_of("import sys; from segda.cli import main; main(sys.argv[1:])", "predict", model, png,
                             "--out", tmp_path / "masks")
    assert "huge.png" in err and "20000x20000 pixels" in err, err[-2000:]
    assert peak < 2 << 30, f"{peak / 2 ** 30:.1f} GB"


def test_a_remote_manifest_never_reaches_local_files_and_a_fifo_shard_never_hangs(http_server, cityscapes_manifest,
                                                                                 tmp_path):
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.data.eval_stream import eval_loader
    from segda.log import SegdaError

    data = json.loads(cityscapes_manifest.read_text())
    data["shards"][0]["url"] = "/etc/passwd"  # on an HTTP manifest: a path on the manifest's own host
    (http_server.root / "m.json").write_text(json.dumps(data))
    assert resolve_dataset(f"{http_server.url}/m.json").shards[0].url == f"{http_server.url}/etc/passwd"
    data["shards"][0]["url"] = "file:///etc/passwd"
    (http_server.root / "m.json").write_text(json.dumps(data))
    with pytest.raises(SegdaError, match="never local files"):
        resolve_dataset(f"{http_server.url}/m.json")
    fifo = tmp_path / "shard.tar"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(SegdaError, match="shard.tar is a pipe"):
        list(eval_loader(resolve_dataset(str(fifo)), DataConfig(workers=0), rank=0, world=1))
    assert time.monotonic() - started < 10


def test_a_yaml_alias_bomb_and_a_huge_brace_range_are_refused_at_once(tmp_path):
    from segda.data.sources import expand_urls
    from segda.log import SegdaError

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                    for p, c in zip("abcdefgh", "bcdefghi")]
    config = tmp_path / "bomb.yaml"
    config.write_text("model:\n  config:\n" + "\n".join("    " + line for line in bomb) + "\n")
    import segda.train  # noqa: F401  (imported before the clock starts: the refusal is what is timed)

    started = time.process_time()
    err = refused("pretrain", config, "--out", tmp_path / "run")
    assert "bomb.yaml expands to more than" in err and time.process_time() - started < 10
    started = time.process_time()
    with pytest.raises(SegdaError, match="expands to more than 100,000 URLs"):
        expand_urls("s/{000000..099999999}.tar")
    assert time.process_time() - started < 10


# ---- D. every network knob reaches every fetch ---------------------------------------------------------------

def _silent_server(trickle: float | None = None):
    """A TCP server that accepts and then says nothing (or, with `trickle`, sends an HTTP head and then a byte
    every `trickle` seconds)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if trickle:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.wait(trickle):
                    try:
                        conn.sendall(b"x")
                    except OSError:
                        break
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


@pytest.mark.slow
def test_timeout_and_retries_reach_the_manifest_and_a_trickle_counts_as_a_stall(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, stop = _silent_server()
    try:
        started = time.monotonic()
        err = refused("evaluate", "--model", tmp_path, "--data", f"{url}/val-manifest.json", "--out", tmp_path / "r",
                      "--timeout", 1, "--retries", 1)
        assert "giving up on" in err and "val-manifest.json after 1 attempts" in err
        assert time.monotonic() - started < 8, "data.timeout and data.retries bound the manifest fetch"
    finally:
        stop.set()
    from segda.data.sources import read_bytes
    from segda.log import SegdaError

    url, stop = _silent_server(trickle=0.015)  # ~64 bytes a second
    try:
        started = time.monotonic()
        with pytest.raises(SegdaError, match="stalled"):
            read_bytes(f"{url}/a.tar", timeout=1.0, retries=2, backoff=0.01)
        assert time.monotonic() - started < 6
    finally:
        stop.set()


# ---- E. errors, not tracebacks -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,named", [
    ("train.seed=-1", "train.seed"), ("data.scale_range=[1, .inf]", "data.scale_range"),
    ("optim.lr=.nan", "optim.lr"), ("optim.poly_power=-1", "optim.poly_power"),
    ("model.config={hidden_sizes: [16, 32]}", "model.config"), ("lora.target_modules=[]", None),
])
def test_bad_config_values_are_named_before_anything_runs(gta5_manifest, tmp_path, override, named):
    args = pretrain_args(gta5_manifest, tmp_path / "run", "train.max_steps=1", override)
    if override.startswith("lora."):
        args = ["adapt", DEMO / "adapt.yaml", "--out", tmp_path / "run", "--set", f"data.train={gta5_manifest}",
                f"model.name_or_path={_tiny_model(tmp_path / 'base')}", "lora.head=none", override]
        named = "lora.target_modules"
    err = refused(*args)
    assert named in err, err


def test_unknown_lora_targets_are_named(gta5_manifest, tmp_path):
    err = refused("adapt", DEMO / "adapt.yaml", "--out", tmp_path / "run", "--set", f"data.train={gta5_manifest}",
                  f"model.name_or_path={_tiny_model(tmp_path / 'base')}", "lora.target_modules=[nonexistent]",
                  "data.workers=0")
    assert "lora.target_modules ['nonexistent']" in err and "match no layer" in err


@pytest.mark.parametrize("flags,named", [
    (["synth", "gta5", "X", "--seed", "-1"], "--seed"), (["evaluate", "--model", "m", "--data", "d", "--out", "o",
                                                          "--timeout", "nan"], "--timeout"),
    (["shards", "gta5", "raw", "--resize", "60000x30000"], "--resize"),
    (["predict", "m", "a.png", "--out", "o", "--mode", "slide", "--crop", "16"], "at least 32x32"),
])
def test_bad_flags_are_named(tmp_path, flags, named, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths land there; the next test runs where it started
    err = refused(*flags)
    assert named in err, err


def test_configs_and_id_maps_that_are_not_utf8_are_named(tmp_path):
    config = tmp_path / "utf16.yaml"
    config.write_bytes("train:\n  max_steps: 3\n".encode("utf-16"))
    assert "utf16.yaml is not UTF-8 text" in refused("pretrain", config, "--out", tmp_path / "run")
    from segda.log import SegdaError
    from segda.shards.encode import load_id_map

    (tmp_path / "ids.yaml").write_bytes("ids: {0: 0}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(SegdaError, match="ids.yaml is not UTF-8 text"):
        load_id_map(tmp_path / "ids.yaml")


def test_damaged_adapter_metadata_is_named(tmp_path, cityscapes_manifest):
    from segda.adapters import attach_lora, save_adapter
    from segda.config import LoraConfig
    from segda.model import build_model, fingerprint

    base = _tiny_model(tmp_path / "base")
    model = build_model(str(base))
    adapter = save_adapter(attach_lora(build_model(str(base)), LoraConfig()), tmp_path / "adapter",
                           base=str(base), base_fingerprint=fingerprint(model), config={})
    for name in ("segda.json", "adapter_config.json"):
        good = (adapter / name).read_bytes()
        (adapter / name).write_text('{"base_model": ')
        err = refused("evaluate", "--model", adapter, "--data", cityscapes_manifest, "--out", tmp_path / "r",
                      "--eval-size", "64x32")
        assert f"{adapter / name} is damaged" in err, err
        (adapter / name).write_bytes(good)


def test_a_very_long_output_name_fits_the_file_systems_name_limit(tmp_path):
    from segda import atomic

    target = tmp_path / ("m" * 250 + ".json")
    atomic.write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert not [p for p in tmp_path.iterdir() if atomic.TMP_MARK in p.name]


# ---- F. misleading answers -----------------------------------------------------------------------------------

def test_a_manifest_url_with_a_query_string_is_read_as_a_manifest(http_server, cityscapes_manifest):
    from segda.data.datasets import resolve_dataset

    for f in cityscapes_manifest.parent.iterdir():
        (http_server.root / f.name).write_bytes(f.read_bytes())
    ds = resolve_dataset(f"{http_server.url}/val-manifest.json?token=x")
    assert ds.num_samples == 10 and ds.indexed


def _answering_server(status: int, headers: dict, body: bytes = b""):
    """An HTTP server answering every GET with `status`, `headers` and `body`."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value.replace("SELF", f"http://127.0.0.1:{self.server.server_port}"))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


@pytest.mark.parametrize("status,headers,named", [
    (302, {"Location": "SELF/loop.json"}, "more than 5 redirects"),
    (302, {"Location": "file:///etc/passwd"}, "another scheme: refused"),
    (200, {"Content-Encoding": "gzip"}, "Content-Encoding: gzip"),
])
def test_redirects_and_compressed_answers_are_named(monkeypatch, status, headers, named):
    from segda.data.sources import read_bytes
    from segda.log import SegdaError

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, server = _answering_server(status, headers, b"\x1f\x8b..." if "Content-Encoding" in headers else b"")
    try:
        with pytest.raises(SegdaError, match=named):
            read_bytes(f"{url}/m.json", retries=1)
    finally:
        server.shutdown()


def test_a_dead_proxy_is_named(monkeypatch):
    from segda.data.sources import read_bytes
    from segda.log import SegdaError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", dead)
    with pytest.raises(SegdaError, match=f"the proxy {dead} .*from the environment"):
        read_bytes("http://example.invalid/m.json", retries=1, timeout=2)


@pytest.mark.parametrize("mode", ["CMYK", "LA", "I;16"])
def test_image_only_shards_take_every_image_predict_takes(tmp_path, mode):
    from PIL import Image

    from segda.data.datasets import resolve_dataset

    (tmp_path / "raw").mkdir()
    image = Image.new(mode, (40, 24), 30 if mode != "CMYK" else (10, 20, 30, 0))
    image.save(tmp_path / "raw" / ("a.jpg" if mode == "CMYK" else "a.png"))
    segda_here("shards", "images", tmp_path / "raw", tmp_path / "shards")
    assert resolve_dataset(str(tmp_path / "shards" / "train-manifest.json")).num_samples == 1
