"""segda: semantic-segmentation domain adaptation at scale.

Dataset creators write WebDataset shards; Accelerate-launched trainers stream them for mixed-precision DDP
pretraining and LoRA adaptation; the evaluator scores any model x dataset pair with the standard 19-class mIoU.
"""

__version__ = "0.2.0"
