"""segda's fused decode head computes transformers' SegformerDecodeHead: the same logits, gradients and BatchNorm
statistics from the same weights, saved under transformers' names, and transformers' own forward wherever a layer
of the head is not a plain torch layer (head LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import SegformerForSemanticSegmentation
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

from segda.adapters import attach_lora
from segda.config import LoraConfig
from segda.decode_head import FusedDecodeHead, transformers_decode_head
from segda.model import build_model, save_model

DEMO = {"hidden_sizes": [16, 32, 80, 128], "decoder_hidden_size": 128}
SMALL = {"hidden_sizes": [8, 16, 24, 32], "decoder_hidden_size": 24, "depths": [1, 1, 1, 1]}


def _pair(config: dict):
    torch.manual_seed(0)
    fused = build_model("", config)
    plain = copy.deepcopy(fused)
    transformers_decode_head(plain)
    assert type(fused.decode_head) is FusedDecodeHead and type(plain.decode_head) is SegformerDecodeHead
    return fused, plain


def _run(model, images: torch.Tensor, train: bool):
    """Logits, every parameter's gradient and the head's BatchNorm statistics after one pass."""
    model.train(train)
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout and stochastic-depth draws for both heads
    logits = model(pixel_values=images).logits
    (logits * torch.linspace(-1, 1, logits.shape[1]).view(1, -1, 1, 1)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = [t.clone() for n, t in model.named_buffers() if "decode_head" in n and "running" in n]
    return logits.detach(), grads, stats


@pytest.mark.parametrize("config,size", [(DEMO, (96, 96)), (SMALL, (100, 70)), ({}, (64, 48))],
                         ids=["demo", "odd-size", "mit-b0"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_fused_head_computes_transformers_head(config, size, train):
    fused, plain = _pair(config)
    images = torch.randn(3, 3, size[1], size[0], generator=torch.Generator().manual_seed(2))
    ours, theirs = _run(fused, images, train), _run(plain, images, train)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
    # gradients that are zero in exact arithmetic (key biases before a softmax; biases a training-mode BatchNorm
    # subtracts again) are rounding noise: each is compared at the scale of the model's largest gradient
    scale = max(g.abs().max() for g in theirs[1].values())
    assert set(ours[1]) == set(theirs[1])
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-3, atol=1e-4 * float(scale), msg=name)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-4, atol=1e-6)


def test_models_keep_transformers_names_and_load_both_ways(tmp_path):
    fused = build_model("", SMALL).eval()
    folder = save_model(fused, tmp_path / "model")
    plain = SegformerForSemanticSegmentation.from_pretrained(folder, use_safetensors=True).eval()
    assert type(plain.decode_head) is SegformerDecodeHead  # transformers itself reads segda's folder
    assert list(plain.state_dict()) == list(fused.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=images).logits, plain(pixel_values=images).logits,
                                   rtol=1e-4, atol=1e-5)
    again = build_model(str(folder))
    assert type(again.decode_head) is FusedDecodeHead


def test_a_partitioned_or_empty_weight_runs_transformers_forward():
    """DeepSpeed ZeRO-3 marks a partitioned parameter with `ds_id` and leaves an empty tensor in its place outside its
    layer's own forward: a folded head would read a weight it does not have."""
    fused, plain = _pair(SMALL)
    images = torch.randn(2, 3, 64, 64)
    head = fused.decode_head
    for layer in (head.linear_fuse, head.linear_projections[2].proj):
        layer.weight.ds_id = 7
        assert not head._foldable()
        with torch.no_grad():  # transformers' forward itself: equal bit for bit
            assert torch.equal(fused.eval()(pixel_values=images).logits, plain.eval()(pixel_values=images).logits)
        del layer.weight.ds_id
        assert head._foldable()
    empty = copy.deepcopy(head)
    empty.linear_projections[0].proj.weight = torch.nn.Parameter(torch.empty(0))
    assert not empty._foldable()


def _randomise_lora(model) -> None:
    """LoRA's B starts at zero, which would hide a head that skipped its LoRA layers."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("head", ["classifier+norm", "full", "lora"])
def test_adapted_heads_compute_what_transformers_computes(head):
    fused, plain = _pair(SMALL)
    cfg = LoraConfig(head=head)
    fused, plain = attach_lora(fused, cfg), attach_lora(plain, cfg)
    torch.manual_seed(3)
    _randomise_lora(fused)
    plain.load_state_dict(fused.state_dict())
    images = torch.randn(2, 3, 64, 64)
    ours, theirs = _run(fused, images, True), _run(plain, images, True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
    assert set(ours[1]) == set(theirs[1])
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-4, atol=1e-6)
    heads = [m for m in fused.modules() if isinstance(m, SegformerDecodeHead)]
    # head LoRA wraps linear_fuse and the projections: the fused head must step aside for transformers' forward
    assert all(h._foldable() == (head != "lora") for h in heads)
