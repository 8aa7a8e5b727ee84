"""The trainers: pretrain and adapt in one process and under a real 2-process accelerate launch, kill -9 and
resume equality, the adapter's exact key set, plain-peft reload, the NaN guard and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_MODEL, segda_here, segda_killed_at

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def common(train_manifest, *extra) -> list[str]:
    return ["--set", f"data.train={train_manifest}", "data.batch_size=2", "data.workers=1", "data.crop_size=64x64",
            "data.base_size=160x88", "data.eval_size=160x88", *extra]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, gta5_manifest, cityscapes_manifest):
    """One tiny pretrain run (1 process) shared by the adapt tests."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    segda_here("pretrain", DEMO / "pretrain.yaml", "--out", out, "--max-steps", 4,
               *common(gta5_manifest, f"data.val={cityscapes_manifest}", TINY_MODEL, "train.checkpoint_every=2"))
    return out


@pytest.mark.slow
def test_pretrain_writes_a_transformers_model_and_run_records(pretrained):
    from transformers import SegformerForSemanticSegmentation

    model = SegformerForSemanticSegmentation.from_pretrained(pretrained / "model", use_safetensors=True)
    assert model.config.num_labels == 19 and model.config.id2label[0] == "road"
    assert not list((pretrained / "model").glob("*.bin"))
    run = json.loads((pretrained / "run.json").read_text())
    assert run["status"] == "done" and run["step"] == 4 and run["world_size"] == 1
    assert run["images_seen"] == 4 * 2 and run["throughput_img_per_s"] > 0
    assert 0 <= run["final"]["val_miou"] <= 1 and run["versions"]["transformers"].startswith("5.")
    lines = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any("val_miou" in x for x in lines)
    assert [p.name for p in (pretrained / "checkpoints").iterdir()] == ["step-000002"]


def expected_adapter_keys(base_dir: Path, targets: list[str]) -> set[str]:
    """Built from the base model's module names, independently of segda's adapter code."""
    from transformers import SegformerForSemanticSegmentation

    base = SegformerForSemanticSegmentation.from_pretrained(base_dir, use_safetensors=True)
    keys = set()
    for name, _ in base.named_modules():
        if name.startswith("segformer.") and any(name.endswith(f".{target}") for target in targets):
            keys |= {f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"}
    for name in ("weight", "bias"):
        keys.add(f"base_model.model.decode_head.classifier.{name}")
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        keys.add(f"base_model.model.decode_head.batch_norm.{name}")
    return keys


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, pretrained, cityscapes_manifest):
    out = tmp_path_factory.mktemp("adapt") / "run"
    segda_here("adapt", DEMO / "adapt.yaml", "--out", out, "--max-steps", 3,
               *common(cityscapes_manifest, f"model.name_or_path={pretrained / 'model'}",
                       f"data.val={cityscapes_manifest}", "lora.dropout=0.1"))
    return out


@pytest.mark.slow
def test_adapter_holds_exactly_the_lora_and_head_tensors(adapted, pretrained):
    folder = adapted / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "segda.json"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "patch_embeddings.proj"]  # as shipped
    assert set(saved) == expected_adapter_keys(pretrained / "model", targets)
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k), "LoRA B must have trained"
    meta = json.loads((folder / "segda.json").read_text())
    full = (pretrained / "model" / "model.safetensors").stat().st_size
    assert (folder / "adapter_model.safetensors").stat().st_size < full / 2
    assert meta["trainable_parameters"] == sum(v.numel() for k, v in saved.items()
                                               if "running" not in k and "num_batches" not in k)


def test_encoder_targets_never_reach_the_heads_layers_of_the_same_name(tmp_path):
    """The decode head has linear_projections.N.proj beside the encoder's patch_embeddings.proj: a bare `proj`
    target is the encoder's only (head LoRA is `lora.head: lora`). A patch-embedding adapter (LoRA on convolutions)
    saves and loads like any other."""
    from segda.adapters import attach_lora, load_adapted, save_adapter
    from segda.config import LoraConfig
    from segda.model import build_model, fingerprint, save_model

    base_dir = save_model(build_model("", {"hidden_sizes": [8, 16, 16, 16], "decoder_hidden_size": 16}),
                          tmp_path / "base")

    def lora_layers(**kw):
        return {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in
                attach_lora(build_model(str(base_dir)), LoraConfig(**kw)).named_modules() if n.endswith("lora_A")}

    patch = {f"segformer.stages.{i}.patch_embeddings.proj" for i in range(4)}
    assert lora_layers(target_modules=["proj"]) == patch
    assert lora_layers(target_modules=["patch_embeddings.proj"]) == patch
    head = {f"decode_head.linear_projections.{i}.proj" for i in range(4)} | {"decode_head.linear_fuse",
                                                                             "decode_head.classifier"}
    assert lora_layers(target_modules=["proj"], head="lora") == patch | head
    # the default targets: every block's attention and MLP layers, in every stage (2 blocks each), and nothing else
    assert lora_layers() == {f"segformer.stages.{i}.blocks.{j}.{layer}" for i in range(4) for j in range(2)
                             for layer in ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                           "attention.o_proj", "mlp.fc1", "mlp.fc2")}

    adapted = attach_lora(build_model(str(base_dir)), LoraConfig(target_modules=["q_proj", "patch_embeddings.proj"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # B starts at zero: a trained adapter has moved it
                param.normal_(0, 0.1)
    save_adapter(adapted, tmp_path / "adapter", base=str(base_dir),
                 base_fingerprint=fingerprint(build_model(str(base_dir))), config={})
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in saved if ".lora_" in k} == (
        patch | {f"segformer.stages.{i}.blocks.{j}.attention.q_proj" for i in range(4) for j in range(2)})
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = adapted.eval()(pixel_values=x).logits
        assert torch.equal(load_adapted(tmp_path / "adapter").eval()(pixel_values=x).logits, expected)
        assert not torch.equal(build_model(str(base_dir)).eval()(pixel_values=x).logits, expected)


@pytest.mark.slow
def test_plain_peft_reload_equals_segda_loader_and_reproduces_training(adapted, pretrained, cityscapes_manifest):
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import SegformerForSemanticSegmentation

    from segda.adapters import load_adapted
    from segda.config import DataConfig
    from segda.data.datasets import resolve_dataset
    from segda.decode_head import fuse_decode_head, transformers_decode_head
    from segda.evaluate import evaluate_model

    base = SegformerForSemanticSegmentation.from_pretrained(pretrained / "model", use_safetensors=True)
    plain = PeftModel.from_pretrained(base, str(adapted / "adapter")).eval()
    ours = load_adapted(adapted / "adapter").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        # segda's fused decode head sums in another order (segda.decode_head): close to transformers' logits, and
        # equal to them bit for bit once it runs transformers' forward, which shows the weights are the same
        torch.testing.assert_close(ours(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=1e-4, atol=1e-5)
        transformers_decode_head(ours)
        assert torch.equal(plain(pixel_values=x).logits, ours(pixel_values=x).logits)
        fuse_decode_head(ours)  # as every segda command runs it, the in-run evaluation too
    # The adapter reproduces the trained model: the in-run final evaluation equals a fresh one from the files.
    run = json.loads((adapted / "run.json").read_text())
    data_cfg = DataConfig(workers=0, eval_size="160x88")
    result = evaluate_model(ours, resolve_dataset(str(cityscapes_manifest)), data_cfg, Accelerator(cpu=True))
    assert result["miou"] == pytest.approx(run["final"]["val_miou"], abs=1e-12)


@pytest.mark.slow
def test_adapt_refuses_a_missing_base_with_a_clear_error(tmp_path, cityscapes_manifest):
    proc = segda_here("adapt", DEMO / "adapt.yaml", "--out", tmp_path / "r", "--max-steps", 1,
                      *common(cityscapes_manifest, f"model.name_or_path={tmp_path / 'nope'}"), check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "config.json" in proc.stderr


@pytest.mark.slow
def test_config_errors_name_the_key(tmp_path, cityscapes_manifest):
    proc = segda_here("pretrain", DEMO / "pretrain.yaml", "--out", tmp_path / "r", "--set", "train.max_step=3",
                      check=False)
    assert proc.returncode == 2 and "train.max_step" in proc.stderr and "train.max_steps" in proc.stderr
    proc = segda_here("pretrain", DEMO / "pretrain.yaml", "--out", tmp_path / "r", "--set", "lora.head=everything",
                      check=False)
    assert proc.returncode == 2 and "lora.head" in proc.stderr and "classifier+norm" in proc.stderr


@pytest.mark.parametrize("override, env, named", [
    ("train.max_step=3", {}, "train.max_steps"),
    ("model.name_or_path={tmp}/nope", {}, "config.json"),
    # what `accelerate launch --config_file deepspeed_zero2.yaml` exports, under ACCELERATE_USE_CPU=1
    ("train.max_steps=3", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "1"}, "unset ACCELERATE_USE_CPU"),
])
def test_a_mistyped_key_or_base_folder_is_named_before_torch_is_imported(tmp_path, override, env, named):
    """Loading torch and transformers takes seconds: a typo must not wait for it (and CLI tests stay fast)."""
    proc = _cli_probe(["adapt", DEMO / "adapt.yaml", "--out", tmp_path / "r", "--set", override.format(tmp=tmp_path)],
                      env)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "NO-TORCH"


def _cli_probe(args: list, env: dict):
    """`segda ARGS` in a fresh process; its stdout says whether torch was ever imported."""
    import os
    import subprocess
    import sys

    probe = ("import sys; from segda.cli import main; rc = main(sys.argv[1:]); "
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**clean, **env})


@pytest.mark.parametrize("world, change, named", [
    (3, {}, "which 3 processes cannot keep"),  # a global batch of 2 x batch_size over 3 ranks
    (2, {"data": {"crop_size": "64x64"}}, "data.crop_size was '64x64'"),
    (2, {"stage": "adapt"}, "resume it with `segda adapt`"),
])
def test_a_resume_its_checkpoint_refuses_is_named_before_torch_is_imported(tmp_path, world, change, named):
    """A relaunch on a number of processes that cannot keep the global batch, or with a changed key, stops each
    rank before it loads torch (the same check train() runs later, on the folder it has locked)."""
    from segda.config import load_config

    config = load_config(DEMO / "pretrain.yaml").to_dict()
    config["data"].update(change.get("data", {}))
    step = tmp_path / "r" / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"stage": change.get("stage", "pretrain"), "step": 2, "world_size": 2,
                                                 "config": config, "data_order": "by_sample", "train": {"step": 2},
                                                 "data": {"epoch": 0, "consumed": 4}}))
    proc = _cli_probe(["pretrain", DEMO / "pretrain.yaml", "--out", tmp_path / "r", "--resume", "auto"],
                      {"WORLD_SIZE": str(world)})
    assert proc.returncode == 2 and named in proc.stderr and str(step) in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "NO-TORCH"


def test_the_early_base_check_passes_hub_ids_and_complete_folders_and_names_what_a_folder_lacks(tmp_path):
    from segda.log import SegdaError
    from segda.modelfiles import check_model_folder

    for fine in ("", "nvidia/mit-b0", "mit-b0"):  # random init from model.config, hub ids: transformers decides
        check_model_folder(fine)
    folder = tmp_path / "base"
    folder.mkdir()
    with pytest.raises(SegdaError, match=f"{folder} has no config.json"):
        check_model_folder(str(folder))
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SegdaError, match="only pickled .bin weights"):
        check_model_folder(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    check_model_folder(str(folder))
    with pytest.raises(SegdaError, match="no config.json"):
        check_model_folder(str(tmp_path / "runs" / "gta5" / "model"))  # a mistyped path that does not exist


def test_sizes_are_width_x_height_and_old_size_lists_say_how_to_fix_them(tmp_path):
    from segda.config import load_config
    from segda.log import SegdaError
    from segda.resume import check_resumable

    old = tmp_path / "old.yaml"  # segda < 0.3: crop_size was [height, width], base_size [width, height]
    old.write_text("data:\n  crop_size: [96, 128]\n")
    with pytest.raises(SegdaError, match=r"write crop_size: 128x96 \(the list \[96, 128\] was \[height, width\]"):
        load_config(old)
    old.write_text("data:\n  base_size: [1280, 720]\n")
    with pytest.raises(SegdaError, match=r"write base_size: 1280x720 .*\[width, height\]"):
        load_config(old)
    with pytest.raises(SegdaError, match=r"--set data.eval_size=320x176"):
        load_config(None, ["data.eval_size=[320, 176]"])
    cfg = load_config(None, ["data.crop_size=128x96", "data.base_size=512"])
    assert cfg.data.crop_size.hw == (96, 128) and cfg.data.base_size.wh == (512, 512)
    assert cfg.to_dict()["data"]["crop_size"] == "128x96"
    # A checkpoint written before the change records lists: the same sizes resume, other sizes are refused.
    saved = {"stage": "pretrain", "step": 2, "world_size": 1, "scheduler": {},
             "config": {**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "crop_size": [96, 128],
                                                   "base_size": [512, 512]}}}
    check_resumable(saved, cfg, "pretrain", tmp_path, world=1)
    saved["config"]["data"]["crop_size"] = [128, 96]
    with pytest.raises(SegdaError, match="data.crop_size"):
        check_resumable(saved, cfg, "pretrain", tmp_path, world=1)


@pytest.mark.parametrize("saved_world, saved_accum, world, policy, accum", [
    (2, 1, 1, "keep_global_batch", 2),  # 2 processes x accum 1 -> 1 process x accum 2
    (1, 2, 2, "keep_global_batch", 1),
    (2, 1, 2, "keep_global_batch", 1),
    (2, 1, 3, "keep_per_rank_batch", 1),  # the global batch changes; nothing refused
])
def test_a_resume_the_early_check_accepts_is_not_refused_and_nothing_is_changed(saved_world, saved_accum, world,
                                                                               policy, accum):
    """The other side of the early check: resumes train() continues pass it, with the grad_accum train() will use,
    and the config it was given is left as it was."""
    from segda.config import load_config
    from segda.resume import refuse_unresumable

    cfg = load_config(DEMO / "pretrain.yaml", [f"train.on_world_change={policy}"])
    saved_config = load_config(DEMO / "pretrain.yaml", [f"train.grad_accum={saved_accum}"]).to_dict()
    saved = {"stage": "pretrain", "step": 2, "world_size": saved_world, "config": saved_config}
    before = cfg.to_dict()
    assert refuse_unresumable(saved, cfg, "pretrain", "ckpt", world=world) == accum
    assert cfg.to_dict() == before


def test_every_shipped_yaml_loads():
    from segda.config import load_config

    shipped = sorted((DEMO.parent).rglob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        load_config(path)


def test_loss_of_a_batch_without_valid_pixels_is_zero_not_nan():
    from segda.model import segmentation_loss

    logits = torch.randn(2, 19, 8, 8, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 32, 32), 255, dtype=torch.uint8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_channels_last_loss_is_cross_entropy_over_the_upsampled_logits(memory_format):
    """pixel_cross_entropy against the textbook NCHW form, values and gradients: a non-square crop (a swapped
    height and width fails), ignored pixels, logits in either memory format, with and without per-pixel weights."""
    import torch.nn.functional as F

    from segda.model import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 19, 12, 20).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 19, (3, 48, 80), dtype=torch.uint8)
    labels[0, :5], labels[2, :, 70:] = 255, 255
    weight = torch.rand(3, 48, 80)

    def textbook(x):
        up = F.interpolate(x.contiguous(), size=(48, 80), mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(up, labels.long(), ignore_index=255, reduction="none")
        valid = (labels != 255).sum()
        return per_pixel.sum() / valid, (per_pixel * weight).sum() / valid

    for ours, theirs in ((segmentation_loss, lambda x: textbook(x)[0]),
                         (lambda x, y: segmentation_loss(x, y, weight), lambda x: textbook(x)[1])):
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        mine, reference = ours(a, labels), theirs(b)
        mine.backward(), reference.backward()
        assert torch.allclose(mine, reference, rtol=1e-5), (mine, reference)
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("clip", [0, 1])
@pytest.mark.slow
def test_non_finite_loss_stops_the_run_before_it_reaches_the_weights(tmp_path, gta5_manifest, clip):
    """lr=1e30: the first step leaves huge weights, the next loss is infinite. That step is skipped on the device;
    the host finds out at the next log line or checkpoint, and no weights with a NaN are ever written."""
    proc = segda_here("pretrain", DEMO / "pretrain.yaml", "--out", tmp_path / "r", "--max-steps", 6,
                      *common(gta5_manifest, TINY_MODEL, "optim.lr=1e30", "optim.warmup_steps=0", "train.log_every=6",
                              f"optim.clip_grad_norm={clip}", "optim.head_lr_mult=1", "train.checkpoint_every=1",
                              "train.keep_checkpoints=10"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "--resume auto" in proc.stderr
    assert not (tmp_path / "r" / "model").exists()
    saved = sorted((tmp_path / "r" / "checkpoints").glob("step-*/model.safetensors"))
    assert saved, "the first (finite) step must have been checkpointed"
    for path in saved:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values()), path


def _final_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.slow
def test_kill_minus_nine_and_resume_gives_the_uninterrupted_weights(tmp_path, gta5_manifest):
    args = ["pretrain", str(DEMO / "pretrain.yaml"), "--max-steps", "12",
            *common(gta5_manifest, TINY_MODEL, "train.checkpoint_every=3", "data.workers=2",
                    "data.crop_size=128x96", "data.photometric=true")]
    segda_here(*args[:2], "--out", tmp_path / "straight", *args[2:])
    victim = tmp_path / "killed"
    segda_killed_at(victim / "checkpoints" / "step-000006", *args[:2], "--out", victim, *args[2:])
    assert not (victim / "model").exists(), "the run finished before the kill: the test proved nothing"
    segda_here(*args[:2], "--out", victim, "--resume", "auto", *args[2:])
    a, b = _final_tensors(tmp_path / "straight"), _final_tensors(victim)
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    run, straight = (json.loads((d / "run.json").read_text()) for d in (victim, tmp_path / "straight"))
    assert run["step"] == straight["step"] == 12 and run["images_seen"] == straight["images_seen"]


@pytest.mark.slow
def test_a_new_run_refuses_an_out_dir_with_old_checkpoints_and_resume_refuses_changed_settings(
        pretrained, tmp_path, gta5_manifest):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    args = ["pretrain", DEMO / "pretrain.yaml", "--out", run, "--max-steps", 4,
            *common(gta5_manifest, TINY_MODEL, "train.checkpoint_every=2")]
    proc = segda_here(*args, check=False)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr
    proc = segda_here(*args[:-1], "data.batch_size=4", "--resume", "auto", check=False)  # batch size changed
    assert proc.returncode == 2 and "data.batch_size" in proc.stderr
    proc = segda_here("adapt", DEMO / "adapt.yaml", "--out", run, "--max-steps", 4, "--resume", "auto",
                      *common(gta5_manifest, f"model.name_or_path={pretrained / 'model'}"), check=False)
    assert proc.returncode == 2 and "resume it with `segda pretrain`" in proc.stderr


def test_models_for_another_class_set_are_refused(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from segda.log import SegdaError
    from segda.model import build_model

    config = SegformerConfig(num_labels=150, hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "ade")
    with pytest.raises(SegdaError, match="150-class"):
        build_model(str(tmp_path / "ade"))
    assert build_model(str(tmp_path / "ade"), new_head_ok=True).config.num_labels == 19  # pretraining from it


def test_the_segda_command_freezes_the_heap_at_exit_and_a_library_call_does_not():
    """The `segda` command skips the interpreter's last collections (1.1 s of every process's exit, segda.cli);
    main() called with arguments (a library or a test) leaves the caller's interpreter alone."""
    import subprocess
    import sys

    probe = ("import atexit, gc, sys; from segda.cli import main\n"
             "sys.argv = ['segda', 'index', '--help']\n"
             "try:\n    main(None if {as_command} else ['index', '--help'])\n"
             "except SystemExit:\n    pass\n"
             "atexit._run_exitfuncs(); print(gc.get_freeze_count() > 0)")
    for as_command, frozen in ((True, "True"), (False, "False")):
        out = subprocess.run([sys.executable, "-c", probe.format(as_command=as_command)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert out.strip().endswith(frozen), out
    # ...and both doors to the command call main() with no arguments
    repo = Path(__file__).resolve().parents[1]
    assert "raise SystemExit(main())" in (repo / "segda" / "__main__.py").read_text()
    assert 'segda = "segda.cli:main"' in (repo / "pyproject.toml").read_text()
