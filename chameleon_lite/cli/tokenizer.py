"""`chameleon-tokenizer`: train the text tokenizer and write `text.model` + `vocab.json`."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.text_tokenizer import iter_text_files, train_text_tokenizer
from chameleon_lite.vocab import UnifiedVocab

log = logging.getLogger(__name__)


def shapes_captions(seed: int, n: int, layout: str = "unambiguous", val_holdout_pairs=()) -> list[str]:
    from chameleon_lite.data.shapes import ShapesWorld

    world = ShapesWorld(seed=seed, split="train", length=n, layout=layout,
                        val_holdout_pairs=tuple(tuple(p) for p in val_holdout_pairs))
    return [world[i].caption for i in range(n)]


def build_tokenizer(cfg: DictConfig) -> UnifiedVocab:
    """Train the text model and write both artifacts into ``cfg.dir``; returns the vocab.

    ``cfg`` is the composed ``train_tokenizer`` config; settings live under ``cfg.tokenizer``. Existing
    artifacts in ``cfg.tokenizer.dir`` (the shipped ones by default) are replaced only with ``overwrite=true``.
    """
    vocab_size = require(cfg, "tokenizer.vocab_size", lambda v: isinstance(v, int) and v > 0, "a positive int")
    n_image = require(cfg, "tokenizer.image_codebook_size", lambda v: isinstance(v, int) and v > 0, "a positive int")
    tok = cfg.tokenizer
    if isinstance(tok.text_files, str):
        raise ConfigError(f"config key 'tokenizer.text_files' = {tok.text_files!r} must be a list of paths, "
                          "e.g. tokenizer.text_files=[a.txt,b.txt]")
    out_dir = resolve_path(tok.dir)
    existing = [str(out_dir / name) for name in ("text.model", "vocab.json") if (out_dir / name).exists()]
    if existing and not cfg.get("overwrite", False):  # every model trained on a tokenizer depends on its ids
        raise ConfigError(f"{' and '.join(existing)} exist(s): models trained on them read their ids. Write a new "
                          "tokenizer elsewhere (tokenizer.name=mine or tokenizer.dir=...), or overwrite=true to "
                          "replace it")
    if (out_dir / "vq.yaml").is_file():  # the VQ beside it decides how many image ids the vocab needs
        from chameleon_lite.vq.api import ImageTokenizer

        codes = ImageTokenizer.read_config(out_dir).codebook_size
        if codes != n_image:
            raise ConfigError(f"tokenizer.image_codebook_size={n_image}, but the VQ in {out_dir} (vq.yaml) has {codes} "
                              f"codes: set tokenizer.image_codebook_size={codes}")
    if tok.text_files:
        corpus = iter_text_files(resolve_path(p) for p in tok.text_files)
    else:
        n = require(cfg, "tokenizer.shapes.n_captions", lambda v: isinstance(v, int) and v > 0, "a positive int")
        corpus = shapes_captions(tok.shapes.seed, n, tok.shapes.get("layout", "unambiguous"),
                                 tok.shapes.get("val_holdout_pairs", []))
    text = train_text_tokenizer(corpus, out_dir / "text.model", vocab_size=vocab_size)
    vocab = UnifiedVocab(n_text=text.vocab_size, n_image=n_image, n_reserved=tok.n_reserved)
    vocab.save(out_dir / "vocab.json")
    log.info("wrote %s and %s: %r", out_dir / "text.model", out_dir / "vocab.json", vocab)
    return vocab


@hydra_app("train_tokenizer")
def main(cfg: DictConfig) -> None:
    build_tokenizer(cfg)


if __name__ == "__main__":
    main()
