"""Shared fixtures: compose the real Hydra configs, overridden to tiny CPU sizes."""

from __future__ import annotations

import os

import pytest
import torch

from chameleon_lite.config import TOKENIZERS_DIR, compose_config
from chameleon_lite.generation.api import Generator
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

os.environ.setdefault("MPLBACKEND", "Agg")

# A training run small enough for CI: tiny model, few rows, fp32 on CPU.
TINY_TRAIN = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=256",
    "data.n_train=256", "data.n_val=32", "data.seq_len=256", "data.batch_size=4",
    "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
    "trainer.precision=32-true", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=3",
]


@pytest.fixture
def tiny_train_cfg(tmp_path):
    def make(*extra: str):
        return compose_config("train", [*TINY_TRAIN, f"run_dir={tmp_path / 'run'}",
                                        f"data.cache_dir={tmp_path / 'cache'}", *extra])

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model trained for a few seconds on the shapes world (shipped tokenizers): the fixture
    of the generation, evaluation and notebook tests (not the 30-minute model)."""
    from chameleon_lite.cli.train import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = compose_config("train", [*TINY_TRAIN, "trainer.max_steps=20", "trainer.val_check_interval=20",
                                   f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}",
                                   "callbacks.loss_curve=null", "callbacks.checkpoint.every_n_train_steps=20"])
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_generator(tiny_checkpoint):
    """A `Generator` on `tiny_checkpoint` (eager, CPU), shared by the generation tests."""
    from chameleon_lite.generation.api import Generator

    return Generator.load(tiny_checkpoint)


# --- `Generator`s on tiny untrained models with the shipped shapes tokenizers: built in a second, no training
# (tests/generation). Here, not in tests/generation/conftest.py: a second module named conftest would shadow this
# one for the test modules that import `compose_config` from it.
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
