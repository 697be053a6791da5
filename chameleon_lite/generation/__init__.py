"""Generation: draw text and image tokens from a ChameleonLM (KV cache, modality state machine, CFG)."""

from chameleon_lite.generation.sampler import Mode, Sampler, SamplingConfig, StepEvent

__all__ = ["Mode", "Sampler", "SamplingConfig", "StepEvent"]
