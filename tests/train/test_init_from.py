"""`chameleon-train init_from=...`: fine-tune from an exported model, a .ckpt or an HF Chameleon directory."""

import json
import logging

import pytest

from chameleon_lite.checkpoint import CheckpointError, init_weights_from, load_model
from chameleon_lite.cli.train import train
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import UnifiedVocab, VocabMismatchError


def max_difference(a: ChameleonLM, b: ChameleonLM) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    """The tiny trained model: its exported directory, the model and its vocab."""
    exported = tiny_checkpoint.parent.parent / "model"
    model, vocab, _ = load_model(exported)
    return exported, model, vocab


@pytest.mark.slow
def test_a_run_starts_from_the_exported_weights_and_records_them(source, tiny_train_cfg, tmp_path, caplog):
    exported, model, _ = source
    # one step at a negligible learning rate: the trained weights are what the run starts from
    result = train(tiny_train_cfg(f"init_from={exported}", "trainer.max_steps=2", "optim.lr=1e-7",
                                  "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"))
    tuned, _, meta = load_model(result["weights"])
    assert max_difference(tuned, model) < 1e-5
    fresh = ChameleonLM(model.cfg)
    assert max_difference(fresh, model) > 0.01  # (a fresh init would not pass the line above)
    assert meta["init_from"] == str(exported.resolve())
    # resuming that run continues its checkpoint, not the source, which need not exist any more; the run's record
    # of where it started stays, whatever the resuming command says
    with caplog.at_level(logging.INFO, logger="chameleon_lite.cli.train"):
        resumed = train(tiny_train_cfg(f"init_from={tmp_path / 'moved'}", "trainer.max_steps=3", "optim.lr=1e-7",
                                       "callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2",
                                       "ckpt_path=last"))
    assert resumed["global_step"] == 3
    assert "its weights, not init_from" in caplog.text
    assert load_model(resumed["weights"])[2]["init_from"] == str(exported.resolve())
    again = train(tiny_train_cfg("trainer.max_steps=4", "optim.lr=1e-7", "callbacks.checkpoint.every_n_train_steps=2",
                                 "trainer.val_check_interval=2", "ckpt_path=last"))  # (no init_from at all)
    assert load_model(again["weights"])[2]["init_from"] == str(exported.resolve())


def test_a_checkpoint_file_initialises_the_same_weights(source, tiny_checkpoint):
    _, model, vocab = source
    target = ChameleonLM(model.cfg)
    init_weights_from(target, tiny_checkpoint, vocab)
    assert max_difference(target, model) == 0.0


def test_an_hf_directory_initialises_the_same_weights(source, tmp_path):
    pytest.importorskip("transformers")
    from chameleon_lite.interop.hf import export_hf

    _, model, vocab = source
    export_hf(model, vocab, tmp_path / "hf")
    target = ChameleonLM(model.cfg)
    init_weights_from(target, tmp_path / "hf", vocab)
    assert max_difference(target, model) == 0.0


def test_another_architecture_is_refused_with_the_overrides_that_match(source):
    exported, model, vocab = source
    other = ModelConfig.from_dict({**model.cfg.__dict__, "dim": 32, "n_layers": 1, "tie_embeddings": True})
    with pytest.raises(CheckpointError) as err:
        init_weights_from(ChameleonLM(other), exported, vocab)
    message = str(err.value)
    assert f"model.dim=32 here, {model.cfg.dim} there" in message
    assert (f"model.dim={model.cfg.dim} model.n_layers={model.cfg.n_layers} model.ffn_dim="
            f"{model.cfg.ffn_hidden_dim} model.tie_embeddings=false") in message  # (the resolved SwiGLU width)
    # training-only knobs are the new run's to choose
    free = ModelConfig.from_dict({**model.cfg.__dict__, "resid_dropout": 0.1, "max_seq_len": 64,
                                  "grad_checkpointing": True})
    init_weights_from(ChameleonLM(free), exported, vocab)


def test_another_vocabulary_is_refused(source):
    exported, model, vocab = source
    other = UnifiedVocab(n_text=vocab.n_text + 8, n_image=vocab.n_image)
    with pytest.raises(VocabMismatchError, match="init_from="):
        init_weights_from(ChameleonLM(model.cfg), exported, other)


def test_a_missing_source_fails_before_any_data_is_prepared(tiny_train_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nowhere does not exist"):
        train(tiny_train_cfg(f"init_from={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "cache").exists()


def test_the_exported_config_has_no_init_from_without_one(source):
    exported, _, _ = source
    assert "init_from" not in json.loads((exported / "config.json").read_text())
