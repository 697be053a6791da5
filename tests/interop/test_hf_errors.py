"""What cannot be converted exactly is refused with an error naming the option (both directions)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import ChameleonConfig

from chameleon_lite.interop.hf import HFInteropError, export_hf, from_hf, import_hf, to_hf
from chameleon_lite.interop.hf_config import (
    hf_config_from_model,
    image_token_name,
    model_config_from_hf,
    vocab_from_hf,
)
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import BASE_SPECIALS, UnifiedVocab, VocabMismatchError

VOCAB = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)


def make_model(**changes) -> ChameleonLM:
    torch.manual_seed(0)
    return ChameleonLM(ModelConfig(**{"vocab_size": VOCAB.size, "dim": 32, "n_layers": 2, "n_heads": 4,
                                      **changes})).eval()


def hf_config(vocabulary_map: dict[str, int], **changes) -> ChameleonConfig:
    return ChameleonConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "vocabulary_map": vocabulary_map,
                              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **changes})


def our_map(n_text: int = 42, n_image: int = 16) -> dict[str, int]:
    return {name: i for i, name in enumerate(BASE_SPECIALS)} | {
        image_token_name(c): len(BASE_SPECIALS) + n_text + c for c in range(n_image)}


@pytest.mark.parametrize(("changes", "option"), [
    ({"qk_norm": False}, "model.qk_norm=false"),
    ({"norm_eps": 1e-6}, "model.norm_eps=1e-06"),
    ({"resid_dropout": 0.1}, "model.resid_dropout=0.1"),
    ({"vocab_size": VOCAB.size + 8}, "model.vocab_size=72"),
    ({"image_pos_embed": True, "image_grid": 2, "image_ids": [VOCAB.image_offset, VOCAB.size]},
     "model.image_pos_embed=true"),
])
def test_export_refuses_what_hf_cannot_represent(changes, option):
    with pytest.raises(HFInteropError, match=option):
        to_hf(make_model(**changes), VOCAB)


def test_resid_dropout_can_be_dropped_and_comes_back_from_the_metadata(tmp_path):
    model = make_model(resid_dropout=0.1)
    export_hf(model, VOCAB, tmp_path / "hf", drop_resid_dropout=True)
    loaded, _, _ = import_hf(tmp_path / "hf")
    assert loaded.cfg == model.cfg


@pytest.mark.parametrize(("changes", "option"), [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"rms_norm_eps": 1e-6}, "rms_norm_eps=1e-06"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='linear'"),
])
def test_import_refuses_hf_options_we_cannot_run(changes, option):
    with pytest.raises(HFInteropError, match=option):
        model_config_from_hf(hf_config(our_map(), **changes))


@pytest.mark.parametrize(("vmap", "changes", "message"), [
    (our_map(), {"vocab_size": 60}, "vocab_size=60"),
    (our_map(), {"bos_token_id": 0}, "bos_token_id=0: chameleon-lite's vocabulary fixes it at 1"),
    (our_map() | {"<pad>": 7}, {}, "'<pad>' is at 7, not 0"),
    ({k: v for k, v in our_map().items() if not k.startswith("IMGIMG")}, {}, "names no image token"),
    (our_map() | {image_token_name(3): 63, image_token_name(15): 51}, {}, "one contiguous id block"),
])
def test_import_refuses_vocabularies_that_do_not_fit(vmap, changes, message):
    with pytest.raises(HFInteropError, match=message):
        vocab_from_hf(hf_config(vmap, **changes))


def test_metas_layout_with_image_tokens_before_text_is_refused_not_permuted():
    """Meta's released vocabulary: <s> <pad> </s> <reserved>, image tokens at 4.., BPE text after them."""
    vmap = {"<s>": 0, "<pad>": 1, "</s>": 2, "<reserved0000>": 3}
    vmap |= {image_token_name(c): 4 + c for c in range(16)} | {"<racm3:break>": 21, "<eoss>": 20, "▁the": 30}
    with pytest.raises(HFInteropError, match=r"image tokens at ids 4-19 .*specials \| text \| image.*not supported"):
        vocab_from_hf(hf_config(vmap, pad_token_id=1, bos_token_id=0))


def test_import_into_an_expected_config_names_every_mismatch(tmp_path):
    export_hf(make_model(), VOCAB, tmp_path / "hf")
    expected = ModelConfig(vocab_size=VOCAB.size, dim=32, n_layers=2, n_heads=4, attn_dropout=0.1, swin_norm=True)
    with pytest.raises(HFInteropError) as err:
        import_hf(tmp_path / "hf", expected=expected)
    assert "model.attn_dropout=0.1 but" in str(err.value) and "attention_dropout=0.0" in str(err.value)
    assert "model.swin_norm=True" in str(err.value) and "model.dim" not in str(err.value)
    other = UnifiedVocab(n_text=41, n_image=15, n_reserved=2, pad_to_multiple=8)
    with pytest.raises(VocabMismatchError):
        import_hf(tmp_path / "hf", vocab=other)
    # matching expectations: the model is built with the caller's training-only knobs
    wanted = ModelConfig(vocab_size=VOCAB.size, dim=32, n_layers=2, n_heads=4, resid_dropout=0.2, max_seq_len=64)
    assert import_hf(tmp_path / "hf", expected=wanted, vocab=VOCAB)[0].cfg == wanted


def test_shared_qk_norm_is_refused_for_heads_that_differ():
    model = make_model(qk_norm_per_head=True)
    with torch.no_grad():
        model.layers[0].attention.qk_norm.q_weight[1] += 0.5
    hf = to_hf(model, VOCAB)
    with pytest.raises(HFInteropError, match="model.qk_norm_per_head=false"):
        from_hf(hf, expected=make_model().cfg)


def test_edited_or_pickled_directories_are_refused(tmp_path):
    export_hf(make_model(), VOCAB, tmp_path / "hf")
    with pytest.raises(HFInteropError, match="overwrite=true"):
        export_hf(make_model(), VOCAB, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"vocab_size": 72}))
    with pytest.raises(HFInteropError, match="vocab_size=72 disagrees"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(HFInteropError, match="model_type='llama'"):
        import_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(HFInteropError, match="pickled weights"):
        import_hf(tmp_path / "hf")


def test_hf_config_carries_the_exact_numbers():
    model = make_model(n_kv_heads=2, rope_theta=5e5, attn_dropout=0.05, tie_embeddings=True)
    config = hf_config_from_model(model.cfg, VOCAB)
    assert (config.num_key_value_heads, config.rope_parameters["rope_theta"], config.attention_dropout) == (2, 5e5, 0.05)
    assert config.tie_word_embeddings and config.intermediate_size == model.cfg.ffn_hidden_dim
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.vocab_size == VOCAB.size and config.vq_config.num_embeddings == VOCAB.n_image


def test_missing_transformers_is_an_install_hint_not_a_bare_import_error():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import chameleon_lite.interop.hf\n"
            "except ImportError as err:\n    print(type(err).__name__, err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'chameleon-lite[hf]'" in out, out
