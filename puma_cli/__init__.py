"""puma: remove marked training points from a trained PyTorch classifier (PUMA, AAAI 2022)."""

__version__ = "0.1.0"
