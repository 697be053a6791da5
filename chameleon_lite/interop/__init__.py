"""Interop with other implementations: Hugging Face transformers' Chameleon (`chameleon_lite.interop.hf`).

Import `chameleon_lite.interop.hf` directly; it needs the optional `transformers` dependency
(`pip install 'chameleon-lite[hf]'`), so this package does not import it eagerly.
"""
