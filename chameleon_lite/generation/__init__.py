"""Generation: draw text and image tokens from a ChameleonLM (KV cache, modality state machine, CFG)."""

from chameleon_lite.generation.config import Mode, SamplingConfig, StepEvent
from chameleon_lite.generation.sampler import Sampler

__all__ = ["Mode", "Sampler", "SamplingConfig", "StepEvent"]
