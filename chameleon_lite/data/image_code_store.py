"""The image-code store of the JSONL source: the VQ codes of every distinct image file content it has encoded.

One store per image tokenizer in ``data.cache_dir``, keyed by the digests of ``vq.safetensors`` and
``vq.yaml`` (a retrained VQ starts a new store), one row per image content digest. The store is a single
safetensors file (codes + the content digests and image sizes in its metadata) replaced atomically, so a
crash never leaves codes and index out of step. Building it (which images to encode, under which lock) is
:func:`chameleon_lite.data.jsonl.load_or_build_jsonl_cache`'s business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from chameleon_lite.data.token_cache import cache_key
from chameleon_lite.files import atomic_path, file_digest
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer


class JsonlCacheError(ValueError):
    """The image-code store on disk does not fit the image tokenizer; the message names the file."""


@dataclass
class ImageCodeStore:
    """Row i holds the codes of the image whose content digest is ``digests[i]`` and its ``sizes[i]``
    (width, height), None in a store written before sizes were stored."""

    digests: list[str]
    sizes: list[tuple[int, int] | None]
    codes: Tensor  # (n, tokens_per_image) int32


def store_path(cache_dir: Path, tokenizer_dir: Path) -> Path:
    settings = {"source": "jsonl-images", "vq": file_digest(tokenizer_dir / "vq.safetensors"),
                "vq_config": file_digest(tokenizer_dir / "vq.yaml")}
    return cache_dir / f"jsonl-images-{cache_key(settings)}.safetensors"


def read_store(path: Path, tok: MultimodalTokenizer) -> ImageCodeStore:
    """The store at ``path``; empty if it does not exist yet."""
    tpi = tok.tokens_per_image
    if not path.is_file():
        return ImageCodeStore([], [], torch.empty(0, tpi, dtype=torch.int32))
    fix = "delete the file to rebuild it"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            digests = json.loads(metadata.get("digests", "null"))
            sizes = json.loads(metadata.get("sizes", "null"))  # null: written before sizes were stored
            codes = f.get_tensor("codes")
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise JsonlCacheError(f"{path}: unreadable image-code store ({err}); {fix}") from None
    if not isinstance(digests, list) or codes.ndim != 2 or len(digests) != codes.shape[0]:
        raise JsonlCacheError(f"{path}: image-code store index and codes disagree; {fix}")
    sizes = [None] * len(digests) if sizes is None else sizes
    if not isinstance(sizes, list) or len(sizes) != len(digests) or not all(
            size is None or (isinstance(size, list) and len(size) == 2 and all(isinstance(n, int) for n in size))
            for size in sizes):
        raise JsonlCacheError(f"{path}: image-code store sizes do not match its index; {fix}")
    if codes.shape[1] != tpi:
        raise JsonlCacheError(f"{path}: stored images have {codes.shape[1]} codes but the image tokenizer makes "
                              f"{tpi}; {fix}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= tok.vocab.n_image):
        raise JsonlCacheError(f"{path}: stored codes span [{int(codes.min())}, {int(codes.max())}], outside the "
                              f"codebook [0, {tok.vocab.n_image}) of the configured tokenizers; {fix}")
    return ImageCodeStore(digests, [None if size is None else tuple(size) for size in sizes], codes)


def write_store(path: Path, store: ImageCodeStore) -> None:
    with atomic_path(path) as tmp:
        save_file({"codes": store.codes.contiguous()}, str(tmp),
                  metadata={"digests": json.dumps(store.digests), "sizes": json.dumps(store.sizes)})
