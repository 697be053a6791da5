"""`chameleon-export-hf`: write a trained checkpoint as a Hugging Face Chameleon directory.

The language model is exported exactly (see `chameleon_lite.interop.hf`). The VQ of the tokenizer directory
recorded in the checkpoint (or `tokenizer_dir=...`) goes along when its encoder is HF-compatible; otherwise
the export says plainly that the image encoder is not exportable (warning, README.md, config.json).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from chameleon_lite.checkpoint import load_model
from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.interop.hf import export_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(cfg: DictConfig) -> Path:
    """Export `cfg.ckpt` to `cfg.out` (the composed `export_hf` config); returns the output directory.

    Raises `ConfigError` naming a missing or wrong key, `HFInteropError` for a model HF cannot represent.
    """
    ckpt = require(cfg, "ckpt", lambda v: isinstance(v, str) and v != "",
                   "a .ckpt file or an exported model directory")
    out = require(cfg, "out", lambda v: isinstance(v, str) and v != "", "an output directory")
    dtype = require(cfg, "dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    for key in ("drop_resid_dropout", "overwrite"):
        require(cfg, key, lambda v: isinstance(v, bool), "true or false")
    model, vocab, meta = load_model(resolve_path(ckpt))
    tokenizer_dir = cfg.get("tokenizer_dir")
    if tokenizer_dir:  # asked for: a typo must not export a model without its image encoder
        tokenizer_dir = str(resolve_path(tokenizer_dir))
        if not (Path(tokenizer_dir) / "vq.safetensors").is_file():
            raise ConfigError(f"tokenizer_dir={cfg.tokenizer_dir}: no vq.safetensors in {tokenizer_dir}; give the "
                              "tokenizer directory the model was trained with, or leave tokenizer_dir unset to use "
                              "the one its checkpoint records")
    else:
        tokenizer_dir = meta.get("tokenizer_dir")
    vq = None
    if tokenizer_dir and (Path(tokenizer_dir) / "vq.safetensors").is_file():
        from chameleon_lite.vq.api import ImageTokenizer

        vq = ImageTokenizer.from_pretrained(resolve_path(tokenizer_dir)).model
    out_dir = export_hf(model, vocab, resolve_path(out), vq=vq, drop_resid_dropout=cfg.drop_resid_dropout,
                        dtype=DTYPES[dtype], overwrite=cfg.overwrite, source=str(ckpt),
                        tokenizer_dir=tokenizer_dir, record=meta)
    print(f"wrote {out_dir} (load it with transformers.ChameleonForConditionalGeneration.from_pretrained)")
    return out_dir


@hydra_app("export_hf")
def main(cfg: DictConfig) -> None:
    export_checkpoint(cfg)


if __name__ == "__main__":
    main()
