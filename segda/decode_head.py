"""SegFormer's decode head without its widest tensor: the same weights and outputs, a faster step.

transformers' head projects each of the 4 encoder stages to D channels, upsamples all four to the first stage's
resolution (1/4 of the frame), concatenates them (4D channels) and mixes them with `linear_fuse`, a 1x1
convolution to D channels. Both the projection and the 1x1 convolution act on each pixel alone and linearly, and
bilinear upsampling is a per-channel weighted mean (its weights sum to 1), so they commute: each stage's slice of
`linear_fuse` folds into its projection (`part @ proj.weight`, `part @ proj.bias`) and applies at the stage's own
resolution; the upsampled D-channel maps are summed. The 4D-channel concat at 1/4 resolution, the convolution over
it, and stage 0's upsampling to its own size (an identity that still cost a pass forward and back) are gone.

The half-width MiT-b0 of `segda demo` (decoder 128) at 96x96, batch 8, one thread: forward and backward 1.7x
faster (`segda bench head`; MiT-b0 at 512x512: 1.9x), the demo's pretraining 1.5x and its self-training 1.37x
(README, "Benchmarks"); the outputs agree to float rounding (`tests/test_decode_head.py`). State-dict names
and checkpoints are transformers' own: a model saved by segda loads in transformers unchanged, and back.

A head whose layers are not plain torch layers with their whole weights (LoRA on them with `lora.head: lora`,
DeepSpeed ZeRO-3 partitions) runs transformers' forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead


class FusedDecodeHead(SegformerDecodeHead):
    """transformers' SegformerDecodeHead with `linear_fuse` folded into the stage projections (module docstring)."""

    def forward(self, encoder_hidden_states, **kwargs) -> torch.Tensor:
        if not self._foldable():
            return super().forward(encoder_hidden_states, **kwargs)
        d, stages = self.config.decoder_hidden_size, len(self.linear_projections)
        weight = self.linear_fuse.weight.flatten(1)  # (D, stages * D); transformers concatenates the last stage first
        size = tuple(encoder_hidden_states[0].shape[2:])
        total = None
        for i, (hidden, mlp) in enumerate(zip(encoder_hidden_states, self.linear_projections)):
            batch, _, height, width = hidden.shape
            part = weight[:, (stages - 1 - i) * d:(stages - i) * d]
            # the projection and the fuse's slice as one linear map: C_i -> D instead of C_i -> D -> D
            rows = F.linear(hidden.flatten(2).transpose(1, 2), part @ mlp.proj.weight, part @ mlp.proj.bias)
            mapped = rows.transpose(1, 2).reshape(batch, d, height, width)
            if (height, width) != size:
                mapped = F.interpolate(mapped, size=size, mode="bilinear", align_corners=False)
            total = mapped if total is None else total + mapped
        hidden = self.dropout(self.activation(self.batch_norm(total)))
        return self.classifier(hidden)

    def _foldable(self) -> bool:
        fuse = self.linear_fuse
        return (_plain(fuse) and fuse.bias is None and fuse.kernel_size == (1, 1)
                and self.config.reshape_last_stage is not False
                and all(_plain(mlp.proj) for mlp in self.linear_projections))


def _plain(layer: nn.Module) -> bool:
    """A torch Linear or Conv2d whose weight is whole here: not wrapped by peft (`lora.head: lora`), not
    partitioned by DeepSpeed ZeRO-3 (whose hooks gather a layer's weight only for its own forward)."""
    return type(layer) in (nn.Linear, nn.Conv2d) and getattr(layer.weight, "ds_id", None) is None \
        and layer.weight.numel() > 0


def fuse_decode_head(model) -> None:
    """Give `model`'s decode head the fused forward (in place: same module, parameters and state-dict names)."""
    head = model.decode_head
    if type(head) is SegformerDecodeHead:
        head.__class__ = FusedDecodeHead


def transformers_decode_head(model) -> None:
    """Give `model`'s decode head transformers' own forward back (the baseline of `segda bench head` and `train`)."""
    head = model.decode_head
    if type(head) is FusedDecodeHead:
        head.__class__ = SegformerDecodeHead
