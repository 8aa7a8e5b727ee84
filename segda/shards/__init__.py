"""Dataset creators: raw GTA5 / Cityscapes folders (real or synthetic) to WebDataset tar shards + a manifest."""
