"""The model rows of a sampling call: prompts checked against the vocab and the model's context, the
modality state each leaves open, and the guidance rows built from them.

Rows come in blocks ``[conditional | image-conditioned | negative | unconditional]`` (the middle two and the
last present as `SamplingConfig` asks). Unconditional = ``<bos>`` (+ the prompt's open image, so
``<bos> caption <boi>`` gives ``<bos> <boi>``), image-conditioned = the prompt without its text (``<bos>``,
``<boi>``, codes, ``<eoi>`` only), negative = a prompt the caller gives per prompt (e.g.
``<bos> a red square <boi>`` beside ``<bos> a red triangle <boi>``: guidance then moves away from what both
share towards what only the prompt says).
"""

from __future__ import annotations

from collections.abc import Sequence

from chameleon_lite.generation.config import SamplingConfig
from chameleon_lite.vocab import UnifiedVocab


def model_rows(prompts: Sequence[Sequence[int]], negatives: Sequence[Sequence[int]] | None, cfg: SamplingConfig,
               vocab: UnifiedVocab, tokens_per_image: int, max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Every model row of the call, in guidance blocks, and the modality state ``left`` after each prompt
    (-1 text, else the image codes still to draw; `Sampler`'s module docstring). Raises ValueError on a prompt,
    negative prompt or stop id the call cannot sample from."""
    prompts = [_check_prompt(i, prompt, cfg, vocab, max_seq_len) for i, prompt in enumerate(prompts)]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    _check_stop_ids(cfg.stop_ids, vocab)
    left = [_initial_left(i, p, vocab, tokens_per_image) for i, p in enumerate(prompts)]
    negatives = _check_negatives(negatives, prompts, left, cfg, vocab, tokens_per_image, max_seq_len)
    rows = list(prompts)
    if cfg.cfg_image_scale is not None:
        rows += [image_context_prompt(p, vocab) for p in prompts]
    rows += negatives
    if cfg.unconditional_row:
        rows += [unconditional_prompt(p, vocab) for p in prompts]
    return rows, left


def image_context_prompt(prompt: list[int], vocab: UnifiedVocab) -> list[int]:
    """The prompt without its text: ``<bos>``, ``<boi>``, ``<eoi>`` and image codes (never empty)."""
    kept = [t for t in prompt if t in (vocab.bos_id, vocab.boi_id, vocab.eoi_id) or vocab.is_image_id(t)]
    return kept or [vocab.bos_id]


def unconditional_prompt(prompt: list[int], vocab: UnifiedVocab) -> list[int]:
    """``<bos>`` plus the prompt's open image, if any (``<bos> caption <boi>`` -> ``<bos> <boi>``)."""
    open_at = _open_image_start(prompt, vocab)
    return [vocab.bos_id] + (prompt[open_at:] if open_at is not None else [])


def _check_prompt(index: int, prompt: Sequence[int], cfg: SamplingConfig, vocab: UnifiedVocab, max_seq_len: int,
                  what: str = "prompt") -> list[int]:
    ids = [int(t) for t in prompt]
    limit = max_seq_len - cfg.max_new_tokens
    if not ids:
        raise ValueError(f"{what} {index} is empty: a prompt needs at least one token (usually <bos>)")
    if len(ids) > limit:
        raise ValueError(f"{what} {index} has {len(ids)} tokens, more than the limit {limit} = model "
                         f"max_seq_len {max_seq_len} - max_new_tokens "
                         f"{cfg.max_new_tokens}: shorten the prompt or lower max_new_tokens")
    bad = [t for t in ids if not 0 <= t < vocab.size]
    if bad:
        raise ValueError(f"{what} {index} has ids {bad[:5]} outside the vocab [0, {vocab.size}) "
                         f"({vocab.layout.describe()})")
    return ids


def _check_negatives(negatives: Sequence[Sequence[int]] | None, prompts: list[list[int]], left: list[int],
                     cfg: SamplingConfig, vocab: UnifiedVocab, tokens_per_image: int,
                     max_seq_len: int) -> list[list[int]]:
    """The negative rows: one per prompt when ``cfg.negative_scale`` is set, none otherwise."""
    if cfg.negative_scale is None:
        if negatives is not None:
            raise ValueError("negatives were given but cfg.negative_scale is None: set negative_scale "
                             "(e.g. 1.0) to guide away from them")
        return []
    if negatives is None or len(negatives) != len(prompts):
        got = "none" if negatives is None else len(negatives)
        raise ValueError(f"cfg.negative_scale={cfg.negative_scale} needs one negative prompt per prompt: "
                         f"{len(prompts)} prompts, {got} negatives")
    rows = [_check_prompt(i, n, cfg, vocab, max_seq_len, what="negative prompt") for i, n in enumerate(negatives)]
    for i, (row, state) in enumerate(zip(rows, left)):
        if _initial_left(i, row, vocab, tokens_per_image) != state:
            raise ValueError(f"negative prompt {i} must leave the same image open as prompt {i} (for text "
                             "-> image both end in <boi>): its guidance row is fed the same image codes")
    return rows


def _check_stop_ids(stop_ids: tuple[int, ...], vocab: UnifiedVocab) -> None:
    for i in stop_ids:
        used = vocab.image_offset + vocab.n_image  # above: padding ids the model never learnt
        if not 0 <= i < used or i == vocab.pad_id or vocab.is_image_id(i):
            raise ValueError(f"stop id {i} must be a non-image, non-<pad> id in [0, {used}): image codes are "
                             "drawn only inside an image, <pad> marks finished rows, ids from "
                             f"{used} up only pad the vocabulary")


def _initial_left(index: int, prompt: list[int], vocab: UnifiedVocab, tokens_per_image: int) -> int:
    """Modality state after the prompt: -1 (text) unless its last ``<boi>`` is still open."""
    open_at = _open_image_start(prompt, vocab)
    if open_at is None:
        return -1
    codes = prompt[open_at + 1:]
    if not all(vocab.is_image_id(t) for t in codes) or len(codes) > tokens_per_image:
        raise ValueError(f"prompt {index} ends inside an image (<boi> at position {open_at}) but what "
                         f"follows is not at most tokens_per_image={tokens_per_image} image codes")
    return tokens_per_image - len(codes)


def _open_image_start(prompt: list[int], vocab: UnifiedVocab) -> int | None:
    """Index of the prompt's last ``<boi>`` if no ``<eoi>`` follows it, else None."""
    boi = max((i for i, t in enumerate(prompt) if t == vocab.boi_id), default=-1)
    eoi = max((i for i, t in enumerate(prompt) if t == vocab.eoi_id), default=-1)
    return boi if boi > eoi else None
