"""ChameleonLightningModule pieces that a tiny CPU run does not reach: gradient clipping under FSDP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

from chameleon_lite.train.module import ChameleonLightningModule
from chameleon_lite.vocab import UnifiedVocab


def _module() -> ChameleonLightningModule:
    vocab = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)
    return ChameleonLightningModule(
        model={"vocab_size": vocab.size, "dim": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 16},
        optim={"warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.1, "z_loss": 0.0}, vocab=vocab.to_dict(),
        total_steps=1)


class RootFSDP:
    """Stands in for the FSDP-wrapped root module (`trainer.model` under FSDP)."""

    def __init__(self) -> None:
        self.clipped: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped.append(max_norm)


def test_fsdp_clips_through_the_root_module_which_lightning_cannot_do():
    module, root = _module(), RootFSDP()
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), model=root)
    module.configure_gradient_clipping(optimizer=None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert root.clipped == [1.0]
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value' under FSDP"):
        module.configure_gradient_clipping(optimizer=None, gradient_clip_val=1.0, gradient_clip_algorithm="value")


def test_other_strategies_keep_lightnings_clipping(monkeypatch):
    module, calls = _module(), []
    module.trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"), model=RootFSDP())
    monkeypatch.setattr(module, "clip_gradients", lambda *args: calls.append(args))
    module.configure_gradient_clipping(optimizer="opt", gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert calls == [("opt", 0.5, "norm")]


@pytest.mark.parametrize("extra", [{}, {"qk_norm_per_head": True, "tie_embeddings": True, "image_pos_embed": True,
                                        "image_grid": 2, "image_ids": [24, 40]}])
def test_weight_decay_reaches_exactly_the_linear_layers_weights(extra):
    vocab = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)
    module = ChameleonLightningModule(
        model={"vocab_size": vocab.size, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16, **extra},
        optim={"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "warmup_steps": 0,
               "schedule": "constant", "min_lr_ratio": 0.1, "z_loss": 0.0}, vocab=vocab.to_dict(), total_steps=1)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    expected = sorted(n for n, p in module.model.named_parameters() if n.endswith(("_proj.weight", "lm_head.weight")))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == expected and len(decayed) == 4 * 2 + (0 if extra else 1)  # a tied head is the embedding
    assert any("qk_norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def _count_on(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json
    from collections import Counter

    import torch.distributed as dist

    from chameleon_lite.train.module import _sum_over_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        total = _sum_over_processes(Counter({"bad image": rank + 1, f"only on rank {rank}": 1}))
        with open(f"{out_dir}/{rank}.json", "w") as f:
            json.dump(total, f)
    finally:
        dist.destroy_process_group()


def test_streamed_skip_counts_are_added_up_over_processes(tmp_path):
    """Each process streams its own shards, so its skip counter holds only its share: the epoch report sums them
    (rank 0 alone used to print and log its own count)."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_count_on, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        total = json.loads((tmp_path / f"{rank}.json").read_text())
        assert total == {"bad image": 3, "only on rank 0": 1, "only on rank 1": 1}


@pytest.mark.parametrize("model_checkpoints", [False, True])
def test_fsdp_strategy_writes_atomically_and_checkpoints_each_block_once(model_checkpoints):
    """FSDP's full checkpoints are written by rank 0 through the strategy's checkpoint IO (it had the default,
    non-atomic one); with the model's own gradient checkpointing FSDP adds no second checkpoint wrapper."""
    from chameleon_lite.train.checkpoint_io import AtomicCheckpointIO
    from chameleon_lite.train.trainer import build_strategy

    strategy = build_strategy("fsdp", model_checkpoints)
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
    assert bool(strategy._activation_checkpointing_kwargs) is not model_checkpoints


def test_a_validation_batch_of_padding_rows_still_runs_the_forward_and_adds_nothing():
    """Padding rows even out the processes' validation shares; a batch of only those must still run the model
    (under FSDP each forward all-gathers the blocks' parameters with every other process) and count nothing."""
    import torch

    from chameleon_lite.data.sequences import IGNORE_INDEX

    module = _module()
    forwards = []
    module.model.register_forward_hook(lambda *args: forwards.append(1))
    for block in module.model.layers:
        block.register_forward_hook(lambda *args: forwards.append(1))
    module.on_validation_epoch_start()
    ids = torch.randint(0, 40, (2, 16))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX),
             "positions": torch.arange(16).expand(2, 16), "doc_lens": torch.tensor([[16], [16]])}
    module.validation_step(batch, 0)
    assert forwards and not module._val_sums.any()
