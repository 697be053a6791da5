"""What to sample and what a stream yields: `SamplingConfig` (validated on construction) and `StepEvent`.

The decoding loop that reads them is `chameleon_lite.generation.sampler.Sampler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class Mode(IntEnum):
    """What produced a streamed token: text mode, image mode (codes and the closing ``<eoi>``), or
    nothing (``DONE``: the row had finished before this step; its token is ``<pad>``)."""

    TEXT = 0
    IMAGE = 1
    DONE = 2


def check_int(name: str, value: object, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}{note}")


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw tokens. Temperature 0 = greedy for that modality; top_k 0 / top_p 1 = no filter.

    - ``max_new_tokens``: upper bound per prompt; a row cut by it may end inside an image.
    - ``allow_images``: whether ``<boi>`` may be drawn in text mode (an image the prompt opened is always
      completed).
    - ``stop_ids``: extra ids that finish a row (``<eos>`` always does). Text-mode ids may be drawn in text
      mode; ``<eoi>`` is never drawn but forced, so ``stop_ids=(vocab.eoi_id,)`` stops after one image
      (text -> image). Image-code ids and ``<pad>`` are refused.
    - ``cfg_scale``: None = no guidance. A float s >= 0 runs an unconditional row beside each prompt and
      draws image codes from ``u + s * (c - u)``; s = 1 draws exactly the unguided tokens (twice the work).
    - ``cfg_image_scale``: with ``cfg_scale``, Chameleon's three-row guidance for prompts that contain images:
      ``u + cfg_image_scale * (i - u) + cfg_scale * (c - i)``, i = the prompt's images without its text.
    - ``negative_scale``: with ``cfg_scale`` and one negative prompt per prompt (`Sampler.generate`'s
      ``negatives``): image codes from ``u + cfg_scale * (c - u) + negative_scale * (c - n)``, n = the
      negative row (the negative prompt + the generated image context). 0 draws the ``cfg_scale`` tokens.
    - ``text_cfg_scale``: None = text from the conditional row. A float s >= 0 draws text from
      ``u + s * (c - u)`` (the unconditional row, run with or without ``cfg_scale``, then keeps generated text);
      s = 1 draws exactly the unguided tokens.
    - ``seed``: seeds the sampler's own ``torch.Generator``; the global RNG is never touched.

    Tasks by prompt: text completion ``<bos> text``; text -> image ``<bos> caption <boi>`` with
    ``stop_ids=(eoi_id,)``; captioning ``<bos> <boi> codes <eoi>`` with ``allow_images=False``; interleaved
    output: any prompt with ``allow_images=True``.
    """

    max_new_tokens: int = 256
    text_temperature: float = 1.0
    text_top_k: int = 0
    text_top_p: float = 1.0
    image_temperature: float = 1.0
    image_top_k: int = 0
    image_top_p: float = 1.0
    allow_images: bool = True
    stop_ids: tuple[int, ...] = ()
    cfg_scale: float | None = None
    cfg_image_scale: float | None = None
    negative_scale: float | None = None
    text_cfg_scale: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        for modality in ("text", "image"):
            temperature = getattr(self, f"{modality}_temperature")
            top_k, top_p = getattr(self, f"{modality}_top_k"), getattr(self, f"{modality}_top_p")
            if not 0 <= temperature < math.inf:  # inf: every logit x 0, NaN
                raise ValueError(f"{modality}_temperature={temperature!r} must be finite and >= 0 (0 = greedy)")
            check_int(f"{modality}_top_k", top_k, minimum=0, note=" (0 = no top-k)")
            if not 0 < top_p <= 1:
                raise ValueError(f"{modality}_top_p={top_p!r} must be in (0, 1] (1 = no top-p)")
        for name in ("cfg_scale", "cfg_image_scale", "negative_scale", "text_cfg_scale"):
            scale = getattr(self, name)
            if scale is not None and not 0 <= scale < math.inf:
                raise ValueError(f"{name}={scale!r} must be finite and >= 0 (or None for no guidance)")
        if self.cfg_image_scale is not None and self.cfg_scale is None:
            raise ValueError("cfg_image_scale needs cfg_scale: three-row guidance mixes both scales")
        if self.negative_scale is not None and self.cfg_scale is None:
            raise ValueError("negative_scale needs cfg_scale: negative prompts add to classifier-free guidance "
                             "(cfg_scale=1.0 for negatives alone)")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def guidance_rows(self) -> int:
        """Model rows per prompt: 1 (no guidance), 2 (cond + uncond), + 1 image-conditioned, + 1 negative."""
        return 1 + self.unconditional_row + (self.cfg_image_scale is not None) + (self.negative_scale is not None)

    @property
    def unconditional_row(self) -> bool:
        """Whether an unconditional row runs beside each prompt (image or text guidance)."""
        return self.cfg_scale is not None or self.text_cfg_scale is not None


@dataclass(frozen=True)
class StepEvent:
    """One decode step, per prompt: the token drawn (``<pad>`` for finished rows), the mode it was drawn
    in, and whether the row has finished (after this step)."""

    step: int
    tokens: list[int]
    modes: list[Mode]
    finished: list[bool]
