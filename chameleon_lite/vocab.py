"""UnifiedVocab: the one id space shared by text and image tokens.

Layout (contiguous blocks, in this order)::

    [0, n_special)                       special tokens: <pad> <bos> <eos> <boi> <eoi> <sep> <reserved_k>...
    [text_offset, text_offset + n_text)  sentencepiece piece ids, shifted by ``text_offset``
    [image_offset, image_offset + n_image) VQ codebook indices, shifted by ``image_offset``
    [image_offset + n_image, size)       padding ids (never produced; keep the embedding a multiple of 64)

The layout is fully described by ``(n_text, n_image, n_reserved, pad_to_multiple)``; two vocabs are
compatible iff their layouts are equal. A checkpoint stores the layout it was trained with and
:meth:`UnifiedVocab.check_compatible` refuses another one with a message naming both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chameleon_lite.files import atomic_write_text

FORMAT_VERSION = 1
BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<sep>")


class VocabError(ValueError):
    """An id or a vocab file that does not fit the layout."""


class VocabMismatchError(VocabError):
    """Two artifacts (checkpoint, tokenizer, vocab.json) were built for different id layouts."""


@dataclass(frozen=True)
class VocabLayout:
    n_text: int
    n_image: int
    n_reserved: int = 10
    pad_to_multiple: int = 64

    def describe(self) -> str:
        return (f"n_text={self.n_text}, n_image={self.n_image}, n_reserved={self.n_reserved}, "
                f"pad_to_multiple={self.pad_to_multiple}")


class UnifiedVocab:
    """Maps text piece ids and image codes into one id space (see module docstring)."""

    def __init__(self, n_text: int, n_image: int, n_reserved: int = 10, pad_to_multiple: int = 64):
        for name, value, low in (("n_text", n_text, 1), ("n_image", n_image, 1), ("n_reserved", n_reserved, 0),
                                 ("pad_to_multiple", pad_to_multiple, 1)):
            if not isinstance(value, int) or value < low:
                raise VocabError(f"UnifiedVocab: {name} must be an int >= {low}, got {value!r}")
        self.layout = VocabLayout(n_text, n_image, n_reserved, pad_to_multiple)
        self.specials: tuple[str, ...] = BASE_SPECIALS + tuple(f"<reserved_{i}>" for i in range(n_reserved))
        self.n_special = len(self.specials)
        self.text_offset = self.n_special
        self.image_offset = self.text_offset + n_text
        used = self.image_offset + n_image
        self.size = -(-used // pad_to_multiple) * pad_to_multiple
        self._special_ids = {tok: i for i, tok in enumerate(self.specials)}
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id, self.sep_id = range(len(BASE_SPECIALS))

    # ----------------------------------------------------------------------------------- sizes
    @property
    def n_text(self) -> int:
        return self.layout.n_text

    @property
    def n_image(self) -> int:
        return self.layout.n_image

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"UnifiedVocab({self.layout.describe()}, size={self.size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnifiedVocab) and other.layout == self.layout

    def __hash__(self) -> int:
        return hash(self.layout)

    # ----------------------------------------------------------------------------------- specials
    def special_id(self, token: str) -> int:
        try:
            return self._special_ids[token]
        except KeyError:
            raise VocabError(f"unknown special token {token!r}; known: {', '.join(self.specials)}") from None

    # ----------------------------------------------------------------------------------- conversions
    def text_to_ids(self, piece_ids: Sequence[int] | torch.Tensor) -> list[int] | torch.Tensor:
        """Sentencepiece piece ids -> unified ids."""
        self._check_range(piece_ids, 0, self.n_text, "text piece id")
        if isinstance(piece_ids, torch.Tensor):
            return piece_ids + self.text_offset
        return [int(p) + self.text_offset for p in piece_ids]

    def ids_to_text(self, ids: Sequence[int] | torch.Tensor) -> list[int] | torch.Tensor:
        """Unified ids of text tokens -> sentencepiece piece ids (every id must be a text id)."""
        self._check_range(ids, self.text_offset, self.image_offset, "text token id")
        if isinstance(ids, torch.Tensor):
            return ids - self.text_offset
        return [int(i) - self.text_offset for i in ids]

    def image_to_ids(self, codes: Sequence[int] | torch.Tensor) -> list[int] | torch.Tensor:
        """VQ codebook indices -> unified ids."""
        self._check_range(codes, 0, self.n_image, "image code")
        if isinstance(codes, torch.Tensor):
            return codes + self.image_offset
        return [int(c) + self.image_offset for c in codes]

    def ids_to_image(self, ids: Sequence[int] | torch.Tensor) -> list[int] | torch.Tensor:
        """Unified ids of image tokens -> VQ codebook indices (every id must be an image id)."""
        self._check_range(ids, self.image_offset, self.image_offset + self.n_image, "image token id")
        if isinstance(ids, torch.Tensor):
            return ids - self.image_offset
        return [int(i) - self.image_offset for i in ids]

    def is_image_id(self, ids: int | torch.Tensor) -> bool | torch.Tensor:
        if isinstance(ids, torch.Tensor):
            return (ids >= self.image_offset) & (ids < self.image_offset + self.n_image)
        return self.image_offset <= int(ids) < self.image_offset + self.n_image

    def is_text_id(self, ids: int | torch.Tensor) -> bool | torch.Tensor:
        if isinstance(ids, torch.Tensor):
            return (ids >= self.text_offset) & (ids < self.image_offset)
        return self.text_offset <= int(ids) < self.image_offset

    def is_special_id(self, ids: int | torch.Tensor) -> bool | torch.Tensor:
        if isinstance(ids, torch.Tensor):
            return (ids >= 0) & (ids < self.n_special)
        return 0 <= int(ids) < self.n_special

    def text_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (size,) True at text ids: what a sampler may draw in text mode (plus <eos>/<boi>)."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        mask[self.text_offset:self.image_offset] = True
        return mask

    def image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool (size,) True at image-code ids: the only ids a sampler may draw inside an image."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        mask[self.image_offset:self.image_offset + self.n_image] = True
        return mask

    def check_ids(self, ids: torch.Tensor, what: str = "token ids") -> None:
        """Raise if any id is outside [0, size): catches data built for another vocab early."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)][:5].tolist()
            raise VocabError(f"{what}: ids {bad} are outside the vocab [0, {self.size}) ({self.layout.describe()}); "
                             "were they built with another tokenizer/vocab.json?")

    def _check_range(self, values: Iterable[int] | torch.Tensor, low: int, high: int, what: str) -> None:
        if isinstance(values, torch.Tensor):
            if values.numel() == 0:
                return
            lo, hi = int(values.min()), int(values.max())
        else:
            values = list(values)
            if not values:
                return
            lo, hi = min(values), max(values)
        if lo < low or hi >= high:
            bad = lo if lo < low else hi
            raise VocabError(f"{what} {bad} out of range [{low}, {high}) for vocab ({self.layout.describe()})")

    # ----------------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "layout": asdict(self.layout), "size": self.size,
                "specials": list(self.specials), "text_offset": self.text_offset,
                "image_offset": self.image_offset}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> UnifiedVocab:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise VocabError(f"{source}: vocab format_version {version!r} is not supported (expected "
                             f"{FORMAT_VERSION}); rebuild it with `chameleon-tokenizer`")
        try:
            vocab = cls(**data["layout"])
        except (KeyError, TypeError) as err:
            raise VocabError(f"{source}: malformed vocab layout ({err}); rebuild it with `chameleon-tokenizer`") from None
        if data.get("size") != vocab.size or data.get("image_offset") != vocab.image_offset:
            raise VocabError(f"{source}: recorded size/offsets disagree with its layout; the file was edited by hand")
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file + rename): a crash never leaves a half-written vocab."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> UnifiedVocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab file {path} does not exist; build it with `chameleon-tokenizer`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise VocabError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def check_compatible(self, other: UnifiedVocab, this_name: str = "this vocab",
                         other_name: str = "the other vocab") -> None:
        if self.layout != other.layout:
            raise VocabMismatchError(
                f"vocab mismatch: {this_name} has layout ({self.layout.describe()}) but {other_name} has "
                f"({other.layout.describe()}); use the tokenizers the model was trained with, or retrain")

