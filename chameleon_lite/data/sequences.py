"""Sequence builder: segments (text / image codes) -> one token document of the unified vocab.

A document is ``<bos> seg_1 seg_2 ... <eos>`` where a text segment is its sentencepiece ids and an
image segment is ``<boi> code_1 ... code_N <eoi>``. The task layouts of the Chameleon paper:

    text -> image   <bos> caption <boi> codes <eoi> <eos>
    image -> text   <bos> <boi> codes <eoi> caption <eos>
    unconditional   <bos> <boi> codes <eoi> <eos>   (a pair's caption dropped, as for classifier-free guidance)
    interleaved     any number of text and image segments in any order

An image-caption pair becomes one of the first three by its task (`PAIR_TASKS`, `SequenceBuilder.pair_document`).

``loss_mask[t]`` says whether token ``t`` is a prediction target (predicted from tokens ``< t``).
``loss_on="all"`` trains on every token after ``<bos>``. It also teaches the unconditional image
distribution (captioning documents start ``<bos> <boi>``), which classifier-free guidance
samples from. ``loss_on="completion"`` trains only on the segments after the prompt segments.
``loss_on="no_prompt_text"`` trains on everything but prompt *text* (the caption before the image of a
text -> image document): images stay targets everywhere (the unconditional image distribution too),
captions only where they follow their image. The text prior then never learns, from prompts alone,
which colour-shape pairs follow each other — the prior that vetoes unseen pairs in captions (README
Results, session 9). ``caption_cfg_scale`` guides against that prior, so it has nothing to read then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from chameleon_lite.vocab import UnifiedVocab

#: The documents an image-caption pair can make (``data.tasks`` weighs them): text -> image, image -> text, and the
#: image alone (its caption dropped: under ``loss_on=completion`` the only source of the unconditional image
#: distribution that classifier-free guidance subtracts; README Results, session 15).
PAIR_TASKS = ("t2i", "caption", "uncond")

IGNORE_INDEX = -100
LossOn = Literal["all", "completion", "no_prompt_text"]
LOSS_ON = ("all", "completion", "no_prompt_text")


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class ImageSegment:
    codes: torch.Tensor  # (N,) or (h, w) VQ codebook indices, int


Segment = TextSegment | ImageSegment


@dataclass
class Document:
    """One training document: ``input_ids`` (L,) int64 and ``loss_mask`` (L,) bool, same length."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
            raise ValueError(f"Document: input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} "
                             "must be 1-D and of equal length")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def has_loss(self) -> bool:
        """Whether any position has a label (`labels` is not all IGNORE_INDEX)."""
        return bool(self.loss_mask[1:].any())

    def labels(self) -> np.ndarray:
        """Next-token labels aligned with ``input_ids``: labels[t] = ids[t+1] where that is a target."""
        labels = np.full(len(self), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(self.loss_mask[1:], self.input_ids[1:], IGNORE_INDEX)
        return labels


class SequenceBuilder:
    """Builds documents and generation prompts; the one place that knows the token layout."""

    def __init__(self, vocab: UnifiedVocab, encode_text, loss_on: LossOn = "all"):
        if loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on={loss_on!r} is invalid: use one of {', '.join(LOSS_ON)}")
        self.vocab = vocab
        self.encode_text = encode_text  # str -> list[int] sentencepiece piece ids
        self.loss_on = loss_on

    # ------------------------------------------------------------------------------ segments
    def text_ids(self, text: str) -> list[int]:
        return self.vocab.text_to_ids(self.encode_text(text))

    def image_ids(self, codes: torch.Tensor | Sequence[int]) -> list[int]:
        """``<boi> codes <eoi>`` as unified ids (codes are VQ indices, any shape)."""
        flat = torch.as_tensor(codes).reshape(-1).tolist()
        return [self.vocab.boi_id, *self.vocab.image_to_ids(flat), self.vocab.eoi_id]

    # ------------------------------------------------------------------------------ documents
    def document(self, segments: Sequence[Segment], n_prompt_segments: int = 0) -> Document:
        """``<bos> segments <eos>``; with ``loss_on='completion'`` the first ``n_prompt_segments`` are context only."""
        if not segments:
            raise ValueError("a document needs at least one segment")
        if self.loss_on == "completion" and n_prompt_segments >= len(segments):
            raise ValueError(f"document has no loss tokens: all {len(segments)} segments are prompt with "
                             "data.loss_on='completion'; keep at least one segment after the prompt")
        ids = [self.vocab.bos_id]
        mask = [False]
        for k, seg in enumerate(segments):
            if isinstance(seg, TextSegment):
                piece = self.text_ids(seg.text)
            elif isinstance(seg, ImageSegment):
                piece = self.image_ids(seg.codes)
            else:
                raise TypeError(f"unknown segment type {type(seg).__name__}; use TextSegment or ImageSegment")
            target = (self.loss_on == "all" or k >= n_prompt_segments
                      or (self.loss_on == "no_prompt_text" and isinstance(seg, ImageSegment)))
            ids.extend(piece)
            mask.extend([target] * len(piece))
        ids.append(self.vocab.eos_id)
        mask.append(True)
        return Document(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))

    def text_to_image(self, caption: str, codes: torch.Tensor) -> Document:
        return self.document([TextSegment(caption), ImageSegment(codes)], n_prompt_segments=1)

    def image_to_text(self, codes: torch.Tensor, caption: str) -> Document:
        return self.document([ImageSegment(codes), TextSegment(caption)], n_prompt_segments=1)

    def pair_document(self, task: str, text: str, codes: torch.Tensor) -> Document:
        """The document of an image-caption pair for ``task`` (one of `PAIR_TASKS`)."""
        if task == "t2i":
            return self.text_to_image(text, codes)
        if task == "caption":
            return self.image_to_text(codes, text)
        if task == "uncond":
            return self.document([ImageSegment(codes)])
        raise ValueError(f"task {task!r} is not one of {', '.join(PAIR_TASKS)}")

    # ------------------------------------------------------------------------------ prompts
    def t2i_prompt(self, caption: str) -> list[int]:
        """``<bos> caption <boi>``: the sampler continues in image mode."""
        return [self.vocab.bos_id, *self.text_ids(caption), self.vocab.boi_id]

    def unconditional_image_prompt(self) -> list[int]:
        """``<bos> <boi>``: the unconditional row of classifier-free guidance."""
        return [self.vocab.bos_id, self.vocab.boi_id]

    def caption_prompt(self, codes: torch.Tensor) -> list[int]:
        """``<bos> <boi> codes <eoi>``: the sampler continues in text mode."""
        return [self.vocab.bos_id, *self.image_ids(codes)]

    def text_prompt(self, text: str) -> list[int]:
        return [self.vocab.bos_id, *self.text_ids(text)]

    def interleaved_prompt(self, segments: Sequence[Segment]) -> list[int]:
        """``<bos> segments`` without ``<eos>``: the model continues the document."""
        return self.document(segments).input_ids[:-1].tolist()
