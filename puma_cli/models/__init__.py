"""Architectures and training: the recipe, SISA shard training, batched prediction."""
