"""MultimodalTokenizer: text tokenizer + image tokenizer + UnifiedVocab, loaded and checked together.

A tokenizer directory (``tokenizers/<name>/``) holds ``text.model``, ``vocab.json`` and
``vq.safetensors`` + ``vq.yaml``. Loading checks that the three agree (text pieces == vocab text
block, VQ codebook == vocab image block) so a mismatch fails at load time, naming the files,
instead of producing garbage ids mid-training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from chameleon_lite.data.sequences import LossOn, SequenceBuilder
from chameleon_lite.files import file_digest
from chameleon_lite.text_tokenizer import TextTokenizer
from chameleon_lite.vocab import UnifiedVocab, VocabMismatchError

#: The files of a tokenizer directory whose bytes give its ids their meaning (vocab.json's layout is checked
#: apart, by `UnifiedVocab.check_compatible`): recorded by training, compared where a model meets tokenizers again.
TOKENIZER_FILES = ("text.model", "vq.safetensors", "vq.yaml")


def tokenizer_digests(path: str | os.PathLike) -> dict[str, str]:
    """``{file: digest}`` of the `TOKENIZER_FILES` present in the tokenizer directory ``path``."""
    path = Path(path)
    return {name: file_digest(path / name) for name in TOKENIZER_FILES if (path / name).is_file()}


def changed_tokenizer_files(recorded: dict[str, str] | None, path: str | os.PathLike) -> list[str]:
    """The recorded files whose bytes in ``path`` are not those recorded (none when nothing was recorded, as
    by models trained before 2026-11-24): a vocab of the same layout can hide another text model or VQ."""
    if not recorded:
        return []
    now = tokenizer_digests(path)
    return [name for name, digest in recorded.items() if now.get(name) != digest]


class MultimodalTokenizer:
    def __init__(self, text: TextTokenizer, vocab: UnifiedVocab, image=None, source: str = "<memory>"):
        if text.vocab_size != vocab.n_text:
            raise VocabMismatchError(f"{source}: text.model has {text.vocab_size} pieces but vocab.json expects "
                                     f"n_text={vocab.n_text}; rebuild vocab.json with `chameleon-tokenizer`")
        if image is not None and image.codebook_size != vocab.n_image:
            raise VocabMismatchError(f"{source}: the VQ has {image.codebook_size} codes but vocab.json expects "
                                     f"n_image={vocab.n_image}; rebuild vocab.json with `chameleon-tokenizer "
                                     f"tokenizer.dir={source} tokenizer.image_codebook_size={image.codebook_size} "
                                     "overwrite=true` (it retrains text.model too: give your corpus as "
                                     "tokenizer.text_files=[...])")
        self.text = text
        self.vocab = vocab
        self.image = image
        self.source = source

    @classmethod
    def from_dir(cls, path: str | os.PathLike, load_image: bool = True,
                 device: torch.device | str = "cpu", **image_limits: int) -> MultimodalTokenizer:
        """``image_limits``: ``max_pixels`` / ``min_side`` of the image tokenizer (`ImageTokenizer`), e.g. a data
        config's, so images its loader accepted are not refused again when encoded."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist; build it with "
                                    "`chameleon-tokenizer` and `chameleon-train-vq` (see README)")
        text = TextTokenizer(path / "text.model")
        vocab = UnifiedVocab.load(path / "vocab.json")
        image = None
        if load_image:
            from chameleon_lite.vq.api import ImageTokenizer

            if not (path / "vq.safetensors").is_file():
                raise FileNotFoundError(f"{path / 'vq.safetensors'} does not exist; train it with "
                                        "`chameleon-train-vq` (see README)")
            image = ImageTokenizer.from_pretrained(path, device=device, **image_limits)
        return cls(text, vocab, image, source=str(path))

    @property
    def tokens_per_image(self) -> int:
        self._need_image()
        return self.image.tokens_per_image

    def builder(self, loss_on: LossOn = "all") -> SequenceBuilder:
        return SequenceBuilder(self.vocab, self.text.encode, loss_on=loss_on)

    # ------------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return self.vocab.text_to_ids(self.text.encode(text))

    def decode_text(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Unified ids -> string; non-text ids (specials, image codes) are skipped."""
        ids = torch.as_tensor(ids).reshape(-1)
        return self.text.decode(self.vocab.ids_to_text(ids[self.vocab.is_text_id(ids)]).tolist())

    # ------------------------------------------------------------------ images
    def encode_images(self, images) -> torch.Tensor:
        """Images (anything ImageTokenizer.encode takes) -> VQ codes (B, h*w), codebook indices."""
        self._need_image()
        codes = self.image.encode(images)
        return codes.reshape(codes.shape[0], -1)

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, h*w) -> float images (B, 3, H, W) in [0, 1]."""
        self._need_image()
        n = self.image.tokens_per_image
        codes = torch.as_tensor(codes)
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"decode_images expects codes of shape (B, {n}), got {tuple(codes.shape)}")
        return self.image.decode(codes)

    def _need_image(self) -> None:
        if self.image is None:
            raise RuntimeError(f"{self.source}: loaded without the image tokenizer (load_image=False)")
