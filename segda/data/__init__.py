"""Data loading: shard sources, streaming datasets and samplers."""
