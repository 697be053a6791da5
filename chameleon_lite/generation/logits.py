"""Pure tensor helpers that turn next-token logits into token ids.

Every helper takes per-row parameters as tensors, so rows of one batch that sit in different
modality modes (text vs image) are handled by the same ops, without per-row Python branches.
Shapes: B rows, V vocab ids. Filtered-out ids carry logit ``-inf``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mix_guidance(logits: Tensor, cfg_scale: float, cfg_image_scale: float | None,
                 negative_scale: float | None = None) -> Tensor:
    """Classifier-free guidance over row blocks: (G * B, V) -> (B, V).

    Rows are ordered in blocks ``[conditional | image-conditioned | negative | unconditional]``, the
    middle two present when their scale is given (G = 2, 3 or 4). With c, i, n, u the blocks' logits:

    - ``[c | u]``:   ``u + s * (c - u)``, computed as ``c + (s - 1) * (c - u)``;
    - ``[c | i | u]`` (Chameleon's ``InBatchInstructCFG``, InstructPix2Pix-style):
      ``u + s_img * (i - u) + s * (c - i)``, computed as ``c + (s - 1) * (c - i) + (s_img - 1) * (i - u)``;
    - a negative block adds ``s_neg * (c - n)`` to either: away from what the negative prompt explains,
      towards what only the prompt does.

    The rewritten forms are algebraically equal and make scale 1 (and ``s_neg`` 0) return ``c`` bit for
    bit, so guided sampling at those scales draws exactly the tokens of unguided sampling. Logits must be
    finite.
    """
    blocks = logits.chunk(2 + (cfg_image_scale is not None) + (negative_scale is not None))
    cond, uncond = blocks[0], blocks[-1]
    if cfg_image_scale is None:
        mixed = cond + (cfg_scale - 1.0) * (cond - uncond)
    else:
        image_cond = blocks[1]
        mixed = cond + (cfg_scale - 1.0) * (cond - image_cond) + (cfg_image_scale - 1.0) * (image_cond - uncond)
    if negative_scale is not None:
        mixed = mixed + negative_scale * (cond - blocks[-2])
    return mixed


def mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Keep each row's ``top_k`` largest logits, then its smallest prefix with probability >= ``top_p``.

    ``logits`` (B, V) float, already temperature-scaled (top-p depends on the temperature, as in HF);
    ``top_k`` (B,) int64, 0 = no limit; ``top_p`` (B,) float in (0, 1], 1 = no limit. Returns a new
    (B, V) tensor with the removed ids at ``-inf``. The largest logit of a row always survives, and ids
    tied with the cut-off value survive too (a threshold, no sort-order tie-breaking).
    """
    vocab = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values  # (B, V)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)  # (B,)
    ranks = torch.arange(vocab, device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better-ranked ids
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # p = 1 never drops (cumsum rounding)
    n_keep = torch.minimum((~drop).sum(dim=-1), k)  # >= 1: rank 0 has mass_before 0
    cutoff = sorted_logits.gather(-1, (n_keep - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard Gumbel noise: ``argmax(logits + noise)`` is a sample from ``softmax(logits)``.

    Drawn only from ``generator`` (never the global RNG), always finite (uniforms are clamped away from 0).
    """
    uniform = torch.rand(shape, generator=generator, device=device)
    uniform.clamp_(min=torch.finfo(torch.float32).tiny)
    return -(-uniform.log()).log()


def pick_tokens(logits: Tensor, sample: Tensor, noise: Tensor | None) -> Tensor:
    """Token ids (B,) int64: Gumbel-max sample where ``sample`` (B,) bool is True, argmax elsewhere.

    ``logits`` (B, V) are masked, temperature-scaled and filtered; ``noise`` (B, V) is ``gumbel_noise`` or
    None when no row samples. Rows must have at least one finite logit.
    """
    if noise is not None:
        logits = torch.where(sample[:, None], logits + noise, logits)
    return logits.argmax(dim=-1)
