"""`chameleon-export-hf` composed from the real conf/export_hf.yaml: a loadable HF directory, clear key errors."""

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

pytest.importorskip("transformers")
from transformers import ChameleonForConditionalGeneration

from chameleon_lite.checkpoint import export_weights
from chameleon_lite.cli.export_hf import export_checkpoint
from chameleon_lite.config import CONF_DIR, ConfigError
from chameleon_lite.interop.hf import HFInteropError, import_hf
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import UnifiedVocab


def compose_export(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="export_hf", overrides=list(overrides))


@pytest.fixture
def trained(tmp_path):
    """An exported chameleon-lite model directory (model.safetensors + config.json)."""
    vocab = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)
    cfg = ModelConfig(vocab_size=vocab.size, dim=32, n_layers=2, n_heads=4, resid_dropout=0.1)
    torch.manual_seed(0)
    model = ChameleonLM(cfg).eval()
    export_weights(SimpleNamespace(model=model, model_config=cfg, vocab=vocab), tmp_path / "model", tmp_path / "tok")
    return model, tmp_path / "model"


def test_cli_writes_a_directory_hf_loads(trained, tmp_path):
    model, ckpt = trained
    out = export_checkpoint(compose_export(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", "dtype=bfloat16",
                                           "drop_resid_dropout=true"))
    hf = ChameleonForConditionalGeneration.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.embed_tokens.weight.bfloat16(), atol=0, rtol=0)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    back, _, meta = import_hf(out)  # fp32 model holding the bf16 weights; tokenizers found again
    assert meta["tokenizer_dir"] == str((tmp_path / "tok").resolve())
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.bfloat16().float())


@pytest.mark.parametrize(("overrides", "message"), [
    ([], "config key 'ckpt'"),
    (["ckpt=x"], "config key 'out'"),
    (["ckpt=x", "out=y", "dtype=int8"], "config key 'dtype'"),
])
def test_cli_names_the_missing_or_wrong_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(compose_export(*overrides))


def test_cli_refuses_a_tokenizer_dir_without_a_vq(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(ConfigError, match=r"tokenizer_dir=.*tokz: no vq.safetensors"):
        export_checkpoint(compose_export(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", f"tokenizer_dir={tmp_path / 'tokz'}",
                                         "drop_resid_dropout=true"))
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_an_unexportable_option_by_name(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(HFInteropError, match="model.resid_dropout=0.1.*drop_resid_dropout=true"):
        export_checkpoint(compose_export(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"))


@pytest.mark.parametrize("hf_compatible", [True, False])
def test_cli_exports_the_tokenizer_dirs_vq_only_when_hf_compatible(trained, tmp_path, hf_compatible, caplog):
    from chameleon_lite.vq.api import ImageTokenizer
    from chameleon_lite.vq.config import VQConfig
    from chameleon_lite.vq.model import VQModel

    _, ckpt = trained
    vq_cfg = VQConfig(image_size=32, base_channels=32, channel_multipliers=(1, 2), latent_channels=8,
                      norm_groups=32 if hf_compatible else 8, codebook_size=16, embed_dim=8,
                      l2_normalize=not hf_compatible)
    ImageTokenizer(VQModel(vq_cfg)).save_pretrained(tmp_path / "tok")
    out = export_checkpoint(compose_export(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", "drop_resid_dropout=true",
                                           f"tokenizer_dir={tmp_path / 'tok'}"))
    hf = ChameleonForConditionalGeneration.from_pretrained(out)
    readme = (out / "README.md").read_text().lower()
    assert ("image encoder: exported:" in readme) == hf_compatible
    if not hf_compatible:
        assert "image encoder" in readme and "not" in readme.split("image encoder", 1)[1][:200]
    assert hf.model.vqmodel.quantize.embedding.weight.shape[0] == 16


def test_an_hf_directory_loads_where_a_model_is_asked_for(trained, tmp_path):
    """`load_model` (chameleon-generate / -eval ckpt=, the notebook, init_from) reads an HF export: it stopped
    with "incomplete metadata ('model')"."""
    from chameleon_lite.checkpoint import load_model

    model, ckpt = trained
    out = export_checkpoint(compose_export(f"ckpt={ckpt}", f"out={tmp_path / 'hf'}", "drop_resid_dropout=true"))
    loaded, vocab, meta = load_model(out)
    ids = torch.randint(0, vocab.size, (1, 12))
    torch.testing.assert_close(loaded(ids), model(ids), atol=1e-5, rtol=1e-5)
    assert not loaded.training and meta["tokenizer_dir"] == str((tmp_path / "tok").resolve())


def test_an_hf_export_keeps_the_models_record(trained, tmp_path):
    """Tokenizer digests and training data survive the export, so loading the HF directory checks them too."""
    from chameleon_lite.interop.hf import export_hf

    model, _ = trained
    vocab = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)
    record = {"tokenizers": {"vq.yaml": "0123456789abcdef"}, "training_data": {"source": "jsonl"}, "other": 1}
    out = export_hf(model, vocab, tmp_path / "hf", record=record, drop_resid_dropout=True)
    _, _, meta = import_hf(out)
    assert meta["tokenizers"] == record["tokenizers"] and meta["training_data"] == record["training_data"]
    assert "other" not in meta


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_a_broken_config_json_is_a_checkpoint_error(tmp_path, text):
    from chameleon_lite.checkpoint import CheckpointError, load_model

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
