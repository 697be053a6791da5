"""Text tokenizer: a sentencepiece BPE model with byte fallback, trained by this repo.

The sentencepiece model knows nothing of the multimodal specials (<bos>, <boi>, ...): those live in
:class:`~chameleon_lite.vocab.UnifiedVocab`, before the text block. sentencepiece keeps only its
``<unk>`` (id 0); byte fallback means every string, any Unicode, round-trips exactly.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from chameleon_lite.files import atomic_write_bytes

log = logging.getLogger(__name__)

BYTE_PIECES = 256  # byte fallback reserves <0x00>..<0xFF>


class TextTokenizerError(ValueError):
    """Bad corpus, bad vocab size or a missing model file."""


class TextTokenizer:
    """Encode/decode text with a trained sentencepiece model."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer model {path} does not exist; "
                                    "train it with `chameleon-tokenizer` (see README)")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode expects str, got {type(text).__name__}")
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def iter_text_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield non-empty lines of UTF-8 text files; a missing file is an error naming it."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise TextTokenizerError(f"text file {path} does not exist; fix the path given in tokenizer.text_files")
        with path.open("r", encoding="utf-8", errors="strict") as f:
            try:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
            except UnicodeDecodeError as err:
                raise TextTokenizerError(f"{path}: not UTF-8 ({err}); re-encode the file as UTF-8") from None


def train_text_tokenizer(corpus: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 512,
                         character_coverage: float = 1.0, seed_sentencepiece_size: int = 100_000,
                         num_threads: int = 1) -> TextTokenizer:
    """Train a BPE sentencepiece model on ``corpus`` and write it atomically to ``out_path``.

    Deterministic: the same corpus and settings give a bit-identical model (single-threaded
    training, no sampling of the input). ``vocab_size`` counts sentencepiece's pieces including
    ``<unk>`` and the 256 byte-fallback pieces; a size the corpus cannot support is an error
    naming the maximum sentencepiece reported, not a silent smaller model.
    """
    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise TextTokenizerError("the text corpus is empty: give non-empty sentences or text files "
                                 "(tokenizer.text_files=[...])")
    min_size = BYTE_PIECES + 2
    if vocab_size < min_size:
        raise TextTokenizerError(f"tokenizer.vocab_size={vocab_size} is too small: byte fallback alone needs "
                                 f"{BYTE_PIECES} pieces plus <unk>; use >= {min_size}")
    # sentencepiece skips lines over max_sentence_length bytes (default 4192) without a word: admit every line
    # (the option only when needed: it is recorded in the model file, which stays bit-identical otherwise)
    longest = max(len(s.encode("utf-8")) for s in sentences)
    long_lines = {"max_sentence_length": longest + 1} if longest > 4192 else {}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=character_coverage, unk_id=0, bos_id=-1, eos_id=-1,
            pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads,
            seed_sentencepiece_size=seed_sentencepiece_size, split_digits=True, hard_vocab_limit=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
            **long_lines,
        )
    except RuntimeError as err:
        msg = str(err)
        if "smaller than required_chars" in msg:  # every distinct character needs its own piece
            raise TextTokenizerError(f"tokenizer.vocab_size={vocab_size} is too small for the corpus' distinct "
                                     f"characters ({msg.strip()}); raise tokenizer.vocab_size or lower "
                                     "tokenizer.character_coverage") from None
        if "Vocabulary size is too high" in msg or "vocab_size" in msg:
            raise TextTokenizerError(f"tokenizer.vocab_size={vocab_size} is larger than this corpus supports "
                                     f"({msg.strip()}); lower tokenizer.vocab_size or add text") from None
        raise TextTokenizerError(f"sentencepiece training failed: {msg.strip()}") from None
    atomic_write_bytes(Path(out_path), model.getvalue())
    log.info("trained text tokenizer (%d pieces) -> %s", vocab_size, out_path)
    return TextTokenizer(out_path)
