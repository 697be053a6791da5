"""chameleon-lite <-> HF Chameleon: bit-exact round trips, equal hidden states and unmasked logits, equal
greedy text, the image-token mapping, and the image encoder's export (fp32, CPU, random weights)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from chameleon_lite.generation.sampler import Sampler, SamplingConfig
from chameleon_lite.interop.hf import export_hf, from_hf, import_hf, to_hf
from chameleon_lite.interop.hf_config import image_token_name
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import BASE_SPECIALS, UnifiedVocab
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.model import VQModel

VOCAB = UnifiedVocab(n_text=40, n_image=16, n_reserved=2, pad_to_multiple=8)  # text 8-47, image 48-63, size 64
CONFIGS = {  # several shapes: MHA / GQA / MQA, pre-norm / swin-norm, shared / per-head QK-norm, tied head
    "mha-shared": {"dim": 32, "n_heads": 4},
    "gqa-perhead-swin": {"dim": 48, "n_heads": 6, "n_kv_heads": 2, "qk_norm_per_head": True, "swin_norm": True},
    "mqa-swin-tied": {"dim": 64, "n_heads": 4, "n_kv_heads": 1, "swin_norm": True, "tie_embeddings": True,
                      "ffn_dim": 96, "rope_theta": 500000.0, "attn_dropout": 0.1, "max_seq_len": 64},
}


def make_model(seed: int = 0, **changes) -> ChameleonLM:
    """A tiny ChameleonLM with every weight random, norms included (per-head QK-norm heads differ)."""
    torch.manual_seed(seed)
    model = ChameleonLM(ModelConfig(**{"vocab_size": VOCAB.size, "n_layers": 2, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Ids over the whole vocabulary: specials, text, image codes and padding ids."""
    ids = torch.randint(0, VOCAB.size, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 3:6] = VOCAB.image_offset + torch.arange(3)  # image tokens are always in
    return ids


def unmasked(hf: ChameleonForConditionalGeneration, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, final hidden states) of HF's model before `forward` masks image-token logits."""
    hidden = hf.model(input_ids=ids).last_hidden_state
    return hf.lm_head(hidden), hidden


def assert_same_weights(a: ChameleonLM, b: ChameleonLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_export_matches_hf_and_round_trips_bit_exactly(name, tmp_path):
    model = make_model(**CONFIGS[name])
    export_hf(model, VOCAB, tmp_path / "hf")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()

    ids = random_ids(2, 14)
    logits, hidden = model(ids, return_hidden=True)
    hf_logits, hf_hidden = unmasked(hf, ids)
    torch.testing.assert_close(hf_hidden, hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(hf_logits, logits, atol=1e-4, rtol=0)

    back, vocab = from_hf(hf)
    assert vocab == VOCAB and back.cfg == model.cfg
    assert_same_weights(model, back)
    loaded, vocab, meta = import_hf(tmp_path / "hf")
    assert vocab == VOCAB and loaded.cfg == model.cfg and meta["vocab"] == VOCAB.to_dict()
    assert_same_weights(model, loaded)
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


@torch.no_grad()
def test_hf_recognises_exactly_our_image_block():
    model = make_model(**CONFIGS["mha-shared"])
    hf = to_hf(model, VOCAB)
    image_ids = list(range(VOCAB.image_offset, VOCAB.image_offset + VOCAB.n_image))
    mapping = hf.model.vocabulary_mapping
    assert mapping.image_tokens == image_ids
    assert mapping.bpe2img == {i: VOCAB.ids_to_image([i])[0] for i in image_ids}
    codes = torch.tensor([[0, 7, 15], [3, 3, 10]])
    assert torch.equal(mapping.convert_img2bpe(codes).long(), VOCAB.image_to_ids(codes))
    # HF's forward masks our image block and nothing else
    ids = random_ids(1, 9)
    masked, logits = hf(input_ids=ids).logits, model(ids)
    image = VOCAB.image_mask()
    assert bool((masked[..., image] == torch.finfo(masked.dtype).min).all())
    torch.testing.assert_close(masked[..., ~image], logits[..., ~image], atol=1e-4, rtol=0)


@torch.no_grad()
def test_random_hf_model_imports_with_equal_logits():
    n_text, n_image = 42, 16
    vmap = {name: i for i, name in enumerate(BASE_SPECIALS)}
    vmap |= {"▁the": 6, "▁a": 7}  # text pieces may be named; they are text ids
    vmap |= {image_token_name(c): 6 + n_text + c for c in range(n_image)}
    hf_config = ChameleonConfig(
        vocab_size=6 + n_text + n_image, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, swin_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, vocabulary_map=vmap,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vq_config={"num_embeddings": n_image, "embed_dim": 8, "latent_channels": 32, "base_channels": 32,
                   "channel_multiplier": [1], "num_res_blocks": 1, "resolution": 16})
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(hf_config).eval()
    for name, p in hf.named_parameters():
        if not name.startswith("model.vqmodel."):
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))

    model, vocab = from_hf(hf)
    assert (vocab.n_text, vocab.n_image, vocab.layout.n_reserved, vocab.size) == (n_text, n_image, 0, 64)
    assert model.cfg.qk_norm_per_head and model.cfg.n_kv_heads == 2 and model.cfg.swin_norm
    assert model.layers[0].attention.qk_norm.q_weight.shape == (4, 12)  # per head, not averaged
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    logits, hidden = model(ids, return_hidden=True)
    hf_logits, hf_hidden = unmasked(hf, ids)
    torch.testing.assert_close(hidden, hf_hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mha-shared", "gqa-perhead-swin"])
@torch.no_grad()
def test_greedy_text_generation_matches_hf_generate(name, tmp_path):
    model = make_model(**CONFIGS[name])
    model.lm_head.weight.mul_(20)  # wide logit gaps: greedy choices are not decided by rounding
    export_hf(model, VOCAB, tmp_path / "hf")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    prompt = [VOCAB.bos_id, *VOCAB.text_to_ids([4, 17, 9, 30])]
    n = 12
    ours = Sampler(model, VOCAB, tokens_per_image=4).generate(
        [prompt], SamplingConfig(text_temperature=0.0, allow_images=False, max_new_tokens=n))[0]
    # our text mode draws text ids or <eos>; HF's forward already removes image ids, suppress the rest
    allowed = VOCAB.text_mask()
    allowed[VOCAB.eos_id] = True
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      suppress_tokens=(~allowed).nonzero().flatten().tolist())
    assert out[0, len(prompt):].tolist() == ours
    assert len(ours) == n or ours[-1] == VOCAB.eos_id


def tiny_vq(**changes) -> VQModel:
    torch.manual_seed(0)
    cfg = VQConfig(image_size=16, base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                   latent_channels=32, norm_groups=32, codebook_size=VOCAB.n_image, embed_dim=8,
                   **{"l2_normalize": False, **changes})
    vq = VQModel(cfg).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()  # spread codes: many distinct nearest codes
    return vq


@torch.no_grad()
def test_compatible_vq_encoder_is_exported_and_gives_our_image_ids(tmp_path):
    vq = tiny_vq()
    export_hf(make_model(**CONFIGS["mha-shared"]), VOCAB, tmp_path / "hf", vq=vq)
    hf, info = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = vq.encode(pixels).indices.flatten(1)  # (2, 64)
    assert codes.unique().numel() > 3
    assert torch.equal(hf.eval().model.get_image_tokens(pixels).long(), VOCAB.image_to_ids(codes))
    note = json.loads((tmp_path / "hf" / "config.json").read_text())["chameleon_lite"]["image_encoder"]
    assert note.startswith("exported")


def test_incompatible_or_absent_vq_is_stated_plainly(tmp_path, caplog):
    model = make_model(**CONFIGS["mha-shared"])
    with caplog.at_level("WARNING", logger="chameleon_lite.interop.hf"):
        export_hf(model, VOCAB, tmp_path / "l2", vq=tiny_vq(l2_normalize=True))
    assert "not exported" in caplog.text and "l2_normalize" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="chameleon_lite.interop.hf"):
        export_hf(model, VOCAB, tmp_path / "patch", vq=tiny_vq(encoder="patch"))
    assert "not exported" in caplog.text and "encoder=patch" in caplog.text
    export_hf(model, VOCAB, tmp_path / "none")
    for out in ("l2", "patch", "none"):
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["chameleon_lite"]["image_encoder"].startswith("not exported")
        assert config["vq_config"]["num_embeddings"] == VOCAB.n_image
        assert "Image encoder: not exported" in (tmp_path / out / "README.md").read_text()
        hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / out)  # still a loadable LM
        assert hf.config.vocab_size == VOCAB.size
