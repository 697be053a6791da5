"""`Generator`s on tiny untrained models with the shipped shapes tokenizers: built in a second, no training."""

from __future__ import annotations

import pytest
import torch

from chameleon_lite.config import TOKENIZERS_DIR
from chameleon_lite.generation.api import Generator
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer


@pytest.fixture(scope="session")
def shapes_tokenizer() -> MultimodalTokenizer:
    return MultimodalTokenizer.from_dir(TOKENIZERS_DIR / "shapes")  # 64 codes per image


def _tiny_model(vocab_size: int) -> ChameleonLM:
    torch.manual_seed(0)
    return ChameleonLM(ModelConfig(vocab_size=vocab_size, dim=64, n_layers=1, n_heads=4, max_seq_len=256)).eval()


@pytest.fixture(scope="session")
def random_generator(shapes_tokenizer) -> Generator:
    """A randomly initialised model: near-uniform logits, so sampled text differs from greedy text."""
    return Generator(_tiny_model(shapes_tokenizer.vocab.size), shapes_tokenizer)


@pytest.fixture(scope="session")
def image_first_generator(shapes_tokenizer) -> Generator:
    """A model that writes the document ``<boi> codes <eoi> <eos>`` after any text prompt.

    Its block weights are 0, so each block adds 0 and the head reads the (normalised) embedding of the last
    token only. Text and specials embed as e0, image codes and ``<boi>`` as e1, ``<eoi>`` as e2; the head maps
    e0 to ``<boi>``, e2 to ``<eos>`` and e1 to random logits over the codes (sampling draws other codes per
    seed, greedy the same ones)."""
    v = shapes_tokenizer.vocab
    model = _tiny_model(v.size)
    with torch.no_grad():
        for p in model.layers.parameters():
            p.zero_()
        basis = torch.eye(model.cfg.dim)
        embed, head = model.embed_tokens.weight, model.lm_head.weight
        embed[:] = basis[0]
        embed[v.image_mask()] = basis[1]
        embed[v.boi_id], embed[v.eoi_id] = basis[1], basis[2]
        head.zero_()
        head[v.boi_id, 0] = head[v.eos_id, 2] = 3.0
        head[v.image_mask(), 1] = 0.2 * torch.randn(v.n_image)  # logits 1.6 N(0, 1): sampling spreads
    return Generator(model, shapes_tokenizer)
