"""chameleon-lite: train Chameleon-style early-fusion multimodal models."""
__version__ = "0.1.0"
