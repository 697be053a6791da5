"""Interop with other implementations: Hugging Face transformers' Chameleon (`chameleon_lite.interop.hf`).

Import `chameleon_lite.interop.hf` (weights, export/import) or `.hf_config` (vocabulary and config
mapping) directly; it needs the optional `transformers` dependency
(`pip install 'chameleon-lite[hf]'`), so this package does not import it eagerly.
"""
