"""ModelConfig: presets load and validate, the 7B preset has Chameleon-7B's size, bad values say the fix."""

import pytest
import torch

from chameleon_lite.model import ChameleonLM, ModelConfig, ModelConfigError


@pytest.mark.parametrize("name", ["tiny", "small", "base", "chameleon_7b"])
def test_presets_load_and_validate(name):
    cfg = ModelConfig.from_preset(name)
    cfg.validate(require_vocab=name == "chameleon_7b")
    assert cfg.head_dim * cfg.n_heads == cfg.dim


def test_tiny_preset_needs_a_vocab_before_building():
    cfg = ModelConfig.from_preset("tiny")
    assert cfg.vocab_size is None
    with pytest.raises(ModelConfigError, match="model.vocab_size"):
        ChameleonLM(cfg)
    assert ChameleonLM(ModelConfig.from_preset("tiny", vocab_size=100)).cfg.vocab_size == 100


def test_chameleon_7b_preset_has_7b_parameters_on_meta_device():
    cfg = ModelConfig.from_preset("chameleon_7b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden_dim, cfg.vocab_size) == (4096, 32, 32, 11008, 65536)
    with torch.device("meta"):
        model = ChameleonLM(cfg)
    assert next(model.parameters()).is_meta
    assert model.num_params() == pytest.approx(7.0e9, rel=0.01)
    assert model.layers[0].attention.qk_norm.q_weight.shape == (32, 128)  # HF's per-head layout


def test_ffn_dim_follows_llama_rule():
    assert ModelConfig(vocab_size=8, dim=4096, n_layers=1, n_heads=32).ffn_hidden_dim == 11008
    assert ModelConfig(vocab_size=8, dim=256, n_layers=1, n_heads=4).ffn_hidden_dim == 704
    assert ModelConfig(vocab_size=8, dim=256, n_layers=1, n_heads=4, ffn_dim=100).ffn_hidden_dim == 100


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"n_heads": 5}, "model.n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
        ({"dim": 12, "n_heads": 4}, "head_dim"),
        ({"attn_impl": "flash"}, "model.attn_impl"),
        ({"dim": 0}, "model.dim"),
        ({"vocab_size": -1}, "model.vocab_size"),
        ({"rope_theta": "1e4"}, "model.rope_theta"),
        ({"attn_dropout": 1.0}, "model.attn_dropout"),
        ({"qk_norm": False, "qk_norm_per_head": True}, "model.qk_norm_per_head"),
        ({"qk_norm": "yes"}, "model.qk_norm"),
        ({"n_layers": 2.0}, "model.n_layers"),
        ({"image_grid": 0}, "model.image_grid"),
        ({"image_ids": [10, 40]}, r"model.image_ids=\[10, 40\] .* <= vocab_size \(32\)"),
        ({"image_ids": [10]}, "model.image_ids"),
    ],
)
def test_bad_values_raise_naming_the_field(changes, names):
    values = {"vocab_size": 32, "dim": 64, "n_layers": 2, "n_heads": 4, **changes}
    with pytest.raises(ModelConfigError, match=names):
        ModelConfig(**values)


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ModelConfigError, match="model.n_head\\b"):
        ModelConfig.from_dict({"vocab_size": 32, "dim": 64, "n_layers": 2, "n_head": 4})
    with pytest.raises(ModelConfigError, match="missing model.n_heads"):
        ModelConfig.from_dict({"vocab_size": 32, "dim": 64, "n_layers": 2})


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ModelConfigError, match="tiny"):
        ModelConfig.from_preset("huge")


def test_image_pos_embed_needs_the_grid_and_the_image_ids_before_building():
    cfg = ModelConfig(vocab_size=32, dim=64, n_layers=1, n_heads=4, image_pos_embed=True, image_grid=2)
    with pytest.raises(ModelConfigError, match="model.image_pos_embed=true needs .* model.image_ids"):
        ChameleonLM(cfg)
