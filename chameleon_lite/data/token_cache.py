"""Token cache: images are VQ-encoded once, not on every step.

Why a cache rather than on-the-fly encoding: on a 2-core CPU the VQ encoder costs about as much
per image as the transformer's training step spends on that image's 64 tokens, and the codes of a
fixed image never change. The cache is keyed by everything that determines its content (data
source settings and a hash of the VQ weights), so a retrained VQ or another world seed builds a
new cache instead of silently reusing stale codes. Files: ``<key>.safetensors`` (codes, int16)
and ``<key>.json`` (captions and metadata), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from chameleon_lite.files import atomic_path, atomic_write_text, build_lock, file_digest

log = logging.getLogger(__name__)


@dataclass
class TokenCache:
    """``codes`` (n, tokens_per_image) int64 VQ indices; ``texts[i]`` the caption of image i; ``meta[i]`` extras."""

    codes: torch.Tensor
    texts: list[str]
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.texts)


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build_shapes_cache(cache_dir: Path, vq_dir: Path, image_tokenizer, *, seed: int, split: str,
                               n: int, image_size: int, holdout_pairs, layout: str = "unambiguous",
                               val_holdout_pairs=(),
                               category_weights=None, relation_captions: bool = False,
                               batch_size: int = 256) -> TokenCache:
    """Encode ``n`` shapes-world samples of ``split`` (or load them if cached with the same key).

    ``category_weights`` (category -> weight; None: all equal) is part of the key only when given, so
    caches built without it stay valid. ``relation_captions``: also store, in ``meta[i]["relation_caption"]``,
    a caption that states where the two objects of a two-object scene are (`relation_caption`, seeded per
    image; the sample's own caption where none applies); part of the key only when True. ``layout``
    (`ShapesWorld`) is always part of the key: caches from before it existed hold free layouts;
    ``val_holdout_pairs`` only when non-empty (the world before them)."""
    from chameleon_lite.data.shapes import ShapesWorld, relation_caption

    settings = {"source": "shapes", "seed": seed, "split": split, "n": n, "image_size": image_size,
                "holdout_pairs": [list(p) for p in holdout_pairs], "layout": layout,
                "vq": file_digest(Path(vq_dir) / "vq.safetensors"),
                "vq_model": image_tokenizer.config.to_dict()}  # the same weights under another vq.yaml code otherwise
    if val_holdout_pairs:
        settings["val_holdout_pairs"] = [list(p) for p in val_holdout_pairs]
    if category_weights is not None:
        category_weights = {str(k): float(v) for k, v in dict(category_weights).items()}
        settings["category_weights"] = dict(sorted(category_weights.items()))
    if relation_captions:
        settings["relation_captions"] = True
    key = f"shapes-{split}-{cache_key(settings)}"
    codes_path, meta_path = Path(cache_dir) / f"{key}.safetensors", Path(cache_dir) / f"{key}.json"
    with build_lock(Path(cache_dir) / f"{key}.lock"):  # one builder; concurrent ones wait, then load it
        if codes_path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            cached = load_file(str(codes_path))["codes"].long()
            if (cached.ndim == 2 and len(cached) == n and cached.shape[1] == image_tokenizer.tokens_per_image
                    and int(cached.min()) >= 0 and int(cached.max()) < image_tokenizer.codebook_size):
                return TokenCache(cached, meta["texts"], meta["meta"])
            log.warning("token cache %s does not hold %d images of %d codes in [0, %d): re-encoding", codes_path, n,
                        image_tokenizer.tokens_per_image, image_tokenizer.codebook_size)

        world = ShapesWorld(seed=seed, image_size=image_size, split=split, length=n,
                            holdout_pairs=tuple(tuple(p) for p in holdout_pairs), category_weights=category_weights,
                            layout=layout, val_holdout_pairs=tuple(tuple(p) for p in val_holdout_pairs))
        codes, texts, metas = [], [], []
        code_dtype = torch.int16 if image_tokenizer.codebook_size <= 2 ** 15 else torch.int32  # int16 would wrap
        for start in tqdm(range(0, n, batch_size), desc=f"VQ-encoding shapes {split} ({n} images)", unit="batch"):
            samples = [world[i] for i in range(start, min(n, start + batch_size))]
            with torch.inference_mode():
                batch_codes = image_tokenizer.encode(torch.stack([s.image for s in samples]))
            codes.append(batch_codes.reshape(len(samples), -1).to(code_dtype))
            texts.extend(s.caption for s in samples)
            metas.extend({"category": s.category, "heldout": bool(s.heldout), "index": start + k}
                         for k, s in enumerate(samples))
            if relation_captions:
                for k, s in enumerate(samples):
                    rng = np.random.default_rng([seed, start + k, 7])
                    metas[start + k]["relation_caption"] = relation_caption(s.spec, s.objects, rng) or s.caption
        all_codes = torch.cat(codes)
        with atomic_path(codes_path) as tmp:
            save_file({"codes": all_codes}, str(tmp))
        atomic_write_text(meta_path, json.dumps({"settings": settings, "texts": texts, "meta": metas}))
        log.info("token cache written: %s (%d images)", codes_path, n)
        return TokenCache(all_codes.long(), texts, metas)
