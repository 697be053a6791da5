"""The transformer: config and presets, attention backends, ChameleonLM, and the LM loss."""

from chameleon_lite.model.attention import KVCache
from chameleon_lite.model.config import ModelConfig, ModelConfigError
from chameleon_lite.model.loss import LMLoss, head_loss, lm_loss
from chameleon_lite.model.transformer import ChameleonLM

__all__ = ["ChameleonLM", "KVCache", "LMLoss", "ModelConfig", "ModelConfigError", "head_loss", "lm_loss"]
