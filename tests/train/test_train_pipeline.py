"""Tiny end-to-end runs of the training job: train -> checkpoint -> resume -> export -> load."""

import csv
import math
from itertools import pairwise

import pytest
import torch

from chameleon_lite.checkpoint import load_model
from chameleon_lite.cli.train import train
from chameleon_lite.config import ConfigError
from chameleon_lite.train.module import lr_lambda
from chameleon_lite.vocab import UnifiedVocab, VocabMismatchError


def read_losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def read_lrs(run_dir):
    """step -> learning rate of the first parameter group, as the LearningRateMonitor logged it."""
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}


@pytest.mark.slow
def test_train_resume_export(tiny_train_cfg, tmp_path, caplog):
    result = train(tiny_train_cfg())
    run = tmp_path / "run"
    assert result["global_step"] == 6
    m = result["metrics"]
    for key in ("train/loss", "train/ce_text", "train/ce_image", "train/z_loss", "stability/hidden_rms",
                "stability/max_logit_image", "perf/tokens_per_s", "val/loss"):
        assert key in m, key
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "loss_curve.png").is_file()
    losses = read_losses(run)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses.values())

    # a resume that forgot the run's overrides is refused before training, naming what differs
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 in the checkpoint, 0.5 now.*data.loss_on"):
        train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=9", "optim.lr=0.5", "data.loss_on=completion"))
    with pytest.raises(ConfigError, match=r"seed: 0 in the checkpoint, 5 now"):  # the seed draws the rows
        train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=9", "seed=5"))
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_val: 1.0 in the checkpoint, 0.25 now"):
        train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=9", "trainer.gradient_clip_val=0.25"))
    # an unknown resume_check is named, not taken for error or warn (checked before any step is trained)
    with pytest.raises(ConfigError, match=r"resume_check='bogus' is invalid: use error or warn"):
        train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=9", "optim.lr=0.5", "resume_check=bogus"))
    # resume continues the step count from the checkpoint, and the loss history with it
    result2 = train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=9", "data.n_val=16",  # validation-only: free
                                   "+trainer.gradient_clip_algorithm=norm"))  # (what no algorithm means: the same)
    assert result2["global_step"] == 9
    assert sorted(read_losses(run)) == list(range(9))
    # the stability monitor's warm-up reference travels with the checkpoint (a resumed run cannot re-measure it)
    states = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    monitor = next(v for k, v in states.items() if k.startswith("StabilityMonitor"))
    assert {"stability/hidden_rms", "stability/max_logit_image"} <= set(monitor["reference"])

    # exported weights and the Lightning checkpoint load into the same model
    a, vocab_a, _ = load_model(run / "model")
    b, vocab_b, meta = load_model(run / "checkpoints" / "last.ckpt")
    assert vocab_a == vocab_b and meta["global_step"] == 9
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)

    # resume_check=warn continues with a changed setting, logging each difference (and the new max_steps)
    caplog.clear()
    with caplog.at_level("WARNING", logger="chameleon_lite.cli.train"):
        result3 = train(tiny_train_cfg("ckpt_path=last", "trainer.max_steps=11", "optim.lr=0.5", "resume_check=warn",
                                       "callbacks.loss_curve=null", "export_weights=false"))
    assert result3["global_step"] == 11
    assert sorted(read_losses(run)) == list(range(11))
    last = run / "checkpoints" / "last.ckpt"
    warnings = [r.getMessage() for r in caplog.records if r.name == "chameleon_lite.cli.train"]
    assert f"resume_check=warn: resuming {last} with changed settings: optim.lr: 0.003 in the checkpoint, 0.5 now" \
        in warnings, warnings  # (data.n_val=16 -> 32 is free: not listed)
    assert any(m.startswith(f"resuming {last} (trained for trainer.max_steps=9) with trainer.max_steps=11")
               for m in warnings), warnings
    assert torch.load(last, weights_only=True)["hyper_parameters"]["optim"]["lr"] == 0.5
    # ... and the run does continue with it: steps 9 and 10 train at 0.5 x the schedule rebuilt over 11 steps
    lrs = read_lrs(run)
    assert [lrs[9], lrs[10]] == pytest.approx([0.5 * lr_lambda(s, 2, 11, "cosine", 0.1) for s in (9, 10)])


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_when_max_steps_is_not_a_multiple_of_the_interval(tiny_train_cfg,
                                                                                               tmp_path):
    result = train(tiny_train_cfg("trainer.max_steps=7"))  # checkpoints every 3 steps: 3, 6, then the end
    ckpts = tmp_path / "run" / "checkpoints"
    assert result["global_step"] == 7
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == [f"step00000{k}.ckpt" for k in (3, 6, 7)]
    final, _, meta = load_model(ckpts / "last.ckpt")
    exported, _, _ = load_model(tmp_path / "run" / "model")
    assert meta["global_step"] == 7
    for (ka, va), (kb, vb) in zip(final.state_dict().items(), exported.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_loss_decreases_through_the_whole_pipeline(tiny_train_cfg, tmp_path):
    train(tiny_train_cfg("trainer.max_steps=30", "optim.lr=3e-3", "data.n_train=16", "data.seq_len=128",
                         "data.batch_size=2", "trainer.val_check_interval=30", "callbacks.loss_curve=null",
                         "export_weights=false"))
    losses = read_losses(tmp_path / "run")
    first, last = losses[min(losses)], losses[max(losses)]
    assert first > 6.0  # ~ln(896) at init
    assert last < first - 1.0


def test_image_pos_embed_gets_grid_and_image_ids_from_the_tokenizers(tiny_train_cfg, tmp_path):
    train(tiny_train_cfg("model.image_pos_embed=true", "trainer.max_steps=2", "callbacks.loss_curve=null"))
    model, vocab, _ = load_model(tmp_path / "run" / "model")
    assert model.cfg.image_grid == 8  # the shipped tokenizer: 64 x 64 images, f = 8
    assert model.cfg.image_ids == [vocab.image_offset, vocab.image_offset + vocab.n_image]
    assert model.image_row_embed.weight.shape == model.image_col_embed.weight.shape == (8, model.cfg.dim)



def test_image_pos_embed_refuses_documents_split_across_rows(tiny_train_cfg):
    """A continued chunk restarts at position 0 and its codes would be embedded from cell 0."""
    from chameleon_lite.config import ConfigError

    with pytest.raises(ConfigError, match=r"documents are longer than data.seq_len=48 .* data.overflow=reject"):
        train(tiny_train_cfg("model.image_pos_embed=true", "data.seq_len=48", "trainer.max_steps=2"))


def test_checkpoint_vocab_mismatch_is_refused(tiny_train_cfg, tmp_path):
    train(tiny_train_cfg("trainer.max_steps=3"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["vocab"] = UnifiedVocab(n_text=100, n_image=512).to_dict()
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(VocabMismatchError, match="n_text=100"):
        train(tiny_train_cfg(f"ckpt_path={bad}", "trainer.max_steps=4"))


@pytest.mark.parametrize("override, named", [("data.seq_len=512", "data.seq_len"),
                                             ("model.vocab_size=64", "model.vocab_size")])
def test_a_model_setting_that_cannot_train_fails_before_any_data_is_encoded(tiny_train_cfg, tmp_path, override, named):
    with pytest.raises(ConfigError, match=named):
        train(tiny_train_cfg(override, f"data.cache_dir={tmp_path / 'fresh_cache'}"))
    assert not (tmp_path / "fresh_cache").exists()


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_lr_schedule_shapes(schedule):
    values = [lr_lambda(s, 10, 100, schedule, 0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert values[-1] == 1.0
    else:
        assert values[-1] == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in pairwise(values[10:]))
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_lambda(50, 10, 100, "linear-ish", 0.1)


def test_a_bad_trainer_setting_fails_before_any_data_is_prepared(tiny_train_cfg, tmp_path):
    """The trainer is built first: Lightning's refusal (FSDP needs CUDA) comes before the token cache."""
    cfg = tiny_train_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    with pytest.raises(Exception, match="requires a GPU accelerator"):
        train(cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_and_save_the_same_checkpoint(tiny_train_cfg, tmp_path):
    """compile=true (regional torch.compile of the decoder blocks) follows the eager run's losses and
    writes a checkpoint with the same parameter names, which loads for sampling."""
    common = ("trainer.max_steps=4", "trainer.precision=32-true", "callbacks.loss_curve=null",
              "export_weights=false")
    train(tiny_train_cfg(*common))
    eager = read_losses(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    compiled_dir = tmp_path / "compiled"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(tiny_train_cfg(*common, "compile=true", f"run_dir={compiled_dir}"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    compiled = read_losses(compiled_dir)
    assert sorted(compiled) == sorted(eager)
    assert all(abs(compiled[s] - eager[s]) < 1e-3 * abs(eager[s]) for s in eager)
    compiled_state = torch.load(compiled_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert list(compiled_state) == list(state)
    model, _, _ = load_model(compiled_dir / "checkpoints" / "last.ckpt")
    assert not any("_orig_mod" in name for name in model.state_dict())


def test_batch_tokens_that_do_not_divide_into_rows_is_a_clear_error(tiny_train_cfg):
    from chameleon_lite.config import ConfigError

    cfg = tiny_train_cfg("data.batch_tokens=1000", "trainer.accumulate_grad_batches=2")
    seq_len = cfg.data.seq_len
    with pytest.raises(ConfigError, match=rf"data.batch_tokens=1000 is not a multiple of data.seq_len={seq_len} x 1 "
                                          rf"process\(es\) x trainer.accumulate_grad_batches=2 = {2 * seq_len}"):
        train(cfg)


@pytest.mark.parametrize("value", [0, -2, "true"])
def test_bad_accumulate_grad_batches_is_named_before_any_work(tiny_train_cfg, value):
    from chameleon_lite.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=.* is invalid: expected an int >= 1"):
        train(tiny_train_cfg(f"trainer.accumulate_grad_batches={value}"))


def test_logged_hparams_hold_the_batch_size_batch_tokens_derived(tiny_train_cfg, tmp_path):
    import yaml

    cfg = tiny_train_cfg("data.batch_tokens=512", "data.batch_size=7", f"run_dir={tmp_path / 'run'}")
    train(cfg)
    hparams = yaml.safe_load((tmp_path / "run" / "logs" / "hparams.yaml").read_text())
    assert hparams["data"]["batch_size"] == 512 // cfg.data.seq_len and hparams["data"]["batch_tokens"] == 512
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # plain types only
    assert ckpt["datamodule_hyper_parameters"]["data"]["batch_size"] == 512 // cfg.data.seq_len


def test_a_misspelled_schedule_fails_before_training_not_at_the_end_of_warmup(tiny_train_cfg):
    with pytest.raises(ValueError, match=r"optim.schedule='cosin' is invalid: use cosine, exponential, constant"):
        train(tiny_train_cfg("optim.schedule=cosin", "optim.warmup_steps=100"))
    assert lr_lambda(0, 0, 10, "constant", 0.1) == 1.0  # (constant needs no warm-up)


def test_tied_embeddings_export_and_load_back(tiny_train_cfg, tmp_path):
    result = train(tiny_train_cfg("model.tie_embeddings=true", "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}"))
    exported, _, _ = load_model(result["weights"])
    from_ckpt, _, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert exported.lm_head.weight is exported.embed_tokens.weight  # still one tensor
    for name, value in from_ckpt.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name


def test_resume_differences_ignore_what_an_older_checkpoint_does_not_record():
    from chameleon_lite.cli.train import setting_differences

    old = {"dim": 64, "qk_norm": True}  # written before image_pos_embed existed
    assert setting_differences(old, {"dim": 64, "qk_norm": True, "image_pos_embed": False}, "model") == []
    assert setting_differences(old, {"dim": 32, "qk_norm": True}, "model") == ["model.dim: 64 in the checkpoint, 32 now"]
    assert setting_differences({"lr": 3e-3, "betas": [0.9, 0.95]}, {"lr": 0.003, "betas": [0.9, 0.95]}, "optim") == []


def test_other_tokenizer_files_of_the_same_vocab_layout_are_refused_on_resume_and_named_elsewhere(
        tiny_train_cfg, tmp_path, caplog):
    """A tokenizer dir whose vocab.json has the layout of the run's (the default sizes give the shipped one's)
    passed every check: a resume without the run's ``tokenizer.dir`` continued on other text ids and VQ codes,
    and sampling decoded with a VQ retrained in place. The checkpoint now records the tokenizer files' digests."""
    import shutil

    from chameleon_lite.config import TOKENIZERS_DIR
    from chameleon_lite.generation.api import Generator

    mine = tmp_path / "tok"
    shutil.copytree(TOKENIZERS_DIR / "shapes", mine)
    result = train(tiny_train_cfg(f"tokenizer.dir={mine}", "export_weights=true"))
    with open(mine / "vq.yaml", "a") as f:  # "retrained in place": other bytes (here only a comment)
        f.write("# retrained\n")
    with pytest.raises(ConfigError, match=rf"tokenizer.dir={mine}: its vq.yaml are not those the run trained"):
        train(tiny_train_cfg(f"tokenizer.dir={mine}", "ckpt_path=last", "trainer.max_steps=9"))
    for model in (tmp_path / "run" / "checkpoints" / "last.ckpt", result["weights"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="chameleon_lite.generation.api"):
            Generator.load(model)
        assert "was trained with other vq.yaml than" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="chameleon_lite.cli.train"):
        train(tiny_train_cfg(f"init_from={result['weights']}", f"tokenizer.dir={mine}", f"run_dir={tmp_path / 'ft'}",
                             "trainer.max_steps=1"))
    assert "was trained with other vq.yaml than tokenizer.dir" in caplog.text
