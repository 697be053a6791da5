"""`model.image_code_embed=appearance`: image codes embedded (and scored) by what they look like."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from chameleon_lite.checkpoint import CheckpointError, load_model
from chameleon_lite.cli.train import recoloured_codes, train
from chameleon_lite.config import TOKENIZERS_DIR, ConfigError
from chameleon_lite.data.datamodule import ChameleonDataModule
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.model import ChameleonLM, ModelConfig, ModelConfigError
from chameleon_lite.model.code_appearance import bake_state
from chameleon_lite.vq.api import ImageTokenizer
from chameleon_lite.vq.data import ShapesImages

START, END, K = 20, 52, 7  # a 64-id vocabulary whose ids 20..51 are 32 image codes


def appearance_model(seed=0, mode="appearance"):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=64, image_code_embed=mode,
                      image_ids=[START, END], image_code_features=K)
    model = ChameleonLM(cfg)
    model.image_codes.set_features(torch.randn(END - START, K))
    return model


def test_image_rows_are_linear_maps_of_the_features_and_text_rows_stay_free():
    model = appearance_model()
    ids = torch.tensor([[1, START, END - 1, 63]])
    embedded = model.embed_tokens(ids)
    x = model._appearance_embedding(ids, embedded)
    features, codes = model.image_codes.features, model.image_codes
    assert torch.allclose(x[0, 1], features[0] @ codes.embed_proj) and torch.allclose(x[0, 2], features[-1] @ codes.embed_proj)
    assert torch.equal(x[0, 0], embedded[0, 0]) and torch.equal(x[0, 3], embedded[0, 3])
    head = model.head_weight()
    assert torch.allclose(head[START:END], features @ codes.head_proj)
    assert torch.equal(head[:START], model.lm_head.weight[:START]) and torch.equal(head[END:], model.lm_head.weight[END:])
    # two codes that look alike are alike to the model: same features -> same rows
    model.image_codes.features[3] = model.image_codes.features[5]
    assert torch.equal(model.head_weight()[START + 3], model.head_weight()[START + 5])


def test_training_moves_the_maps_not_the_unused_image_rows():
    model = appearance_model()
    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    assert model.image_codes.embed_proj.grad.abs().sum() > 0 and model.image_codes.head_proj.grad.abs().sum() > 0
    assert model.lm_head.weight.grad[START:END].abs().sum() == 0 and model.embed_tokens.weight.grad[START:END].abs().sum() == 0
    assert model.lm_head.weight.grad[:START].abs().sum() > 0


def test_free_plus_appearance_adds_the_two_rows():
    model = appearance_model(mode="free+appearance")
    ids = torch.tensor([[1, START + 4]])
    embedded = model.embed_tokens(ids)
    x = model._appearance_embedding(ids, embedded)
    codes = model.image_codes
    assert torch.allclose(x[0, 1], model.embed_tokens.weight[START + 4] + codes.features[4] @ codes.embed_proj)
    assert torch.equal(x[0, 0], embedded[0, 0])
    assert torch.allclose(model.head_weight()[START:END], model.lm_head.weight[START:END] + codes.features @ codes.head_proj)


@pytest.mark.parametrize("mode", ["appearance", "free+appearance"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_baked_plain_model_computes_the_same_logits(autocast, mode):
    model = appearance_model(mode=mode).eval()
    state, plain_cfg = bake_state(model.state_dict(), model.cfg)
    assert plain_cfg.image_code_embed == "free" and plain_cfg.image_code_features is None and plain_cfg.image_ids is None
    assert model.cfg.image_code_embed == mode  # (the model's own config is left alone)
    plain = ChameleonLM(plain_cfg).eval()
    plain.load_state_dict(state)  # strict: no appearance key left, none missing
    ids = torch.randint(0, 64, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a, b = model(ids), plain(ids)
        sliced = model(ids, vocab_slice=slice(START, END)), plain(ids, vocab_slice=slice(START, END))
    assert torch.allclose(a, b, atol=1e-6 if not autocast else 0.0) and torch.allclose(*sliced, atol=1e-6 if not autocast else 0.0)


def test_config_checks():
    with pytest.raises(ModelConfigError, match="tie_embeddings=false"):
        ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, image_code_embed="appearance", tie_embeddings=True)
    with pytest.raises(ModelConfigError, match="image_code_embed='pixels' is not one of"):
        ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, image_code_embed="pixels")
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, image_code_embed="appearance")  # filled later
    with pytest.raises(ModelConfigError, match="needs model.image_ids .* and model.image_code_features"):
        ChameleonLM(cfg)
    with pytest.raises(ValueError, match=r"features of shape \(3, 7\), but the model holds \(32, 7\)"):
        appearance_model().image_codes.set_features(torch.zeros(3, K))


def test_code_appearance_separates_pattern_from_colour():
    """Measured on shapes-world images: one row per code, all-zero for codes the images do not use, the blank
    background code with the least ink, the same rows for the same images."""
    tok = ImageTokenizer.from_pretrained(TOKENIZERS_DIR / "shapes")
    world = ShapesWorld(split="train", length=64, seed=0)
    codes = tok.encode(torch.stack([world[i].image for i in range(64)]))
    features = tok.code_appearance(codes)
    n_pattern = tok.code_appearance_size() - 5
    assert features.shape == (tok.codebook_size, n_pattern + 5) and n_pattern == 64
    seen = torch.zeros(tok.codebook_size, dtype=torch.bool)
    seen[codes.flatten()] = True
    assert torch.equal(features[:, -1] == 1, seen) and (features[~seen] == 0).all()  # unseen codes: all-zero rows
    fraction = features[:, n_pattern + 3]  # ink fraction (standardised): corner cells are blank, centres are inked
    corner = codes[:, 0, 0].mode().values
    assert fraction[corner] == fraction[seen].min()
    assert torch.equal(tok.code_appearance(codes), features)  # deterministic
    with pytest.raises(ValueError, match="codes of shape"):
        tok.code_appearance(torch.zeros(0, 8, 8, dtype=torch.long))


def test_train_export_and_load_give_a_plain_model_with_the_trained_logits(tiny_train_cfg, tmp_path, monkeypatch):
    result = train(tiny_train_cfg("model.image_code_embed=appearance", "trainer.max_steps=3", "export_weights=true",
                                  "callbacks.loss_curve=null"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    trained_cfg = ckpt["hyper_parameters"]["model"]
    assert trained_cfg["image_code_embed"] == "appearance" and trained_cfg["image_code_features"] == 69
    features = ckpt["state_dict"]["model.image_codes.features"]
    assert features.shape == (512, 69) and (features[:, -1] == 1).sum() > 100  # measured, saved with the weights
    from_ckpt, vocab, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    exported, _, meta = load_model(result["weights"])
    assert meta["model"]["image_code_embed"] == "free"
    for model in (from_ckpt, exported):
        assert model.cfg.image_code_embed == "free" and not hasattr(model, "image_codes")
    trained = ChameleonLM(ModelConfig.from_dict(trained_cfg))
    trained.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    ids = torch.randint(0, vocab.size, (1, 40))
    expected = trained.eval()(ids)
    assert torch.allclose(from_ckpt(ids), expected, atol=1e-6) and torch.allclose(exported(ids), expected, atol=1e-6)

    # a resume trains on with the checkpoint's features: it does not measure the codes again
    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed run measured the code appearance again")

    monkeypatch.setattr(ImageTokenizer, "code_appearance", measured_again)
    resumed = train(tiny_train_cfg("model.image_code_embed=appearance", "trainer.max_steps=5", "ckpt_path=last",
                                   "export_weights=true", "callbacks.loss_curve=null"))
    assert resumed["global_step"] == 5
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(after["model.image_codes.features"], features)


def test_appearance_recolour_also_measures_the_codes_of_the_training_images_recoloured(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg("model.image_code_embed=free+appearance", "appearance_recolour=true", "trainer.max_steps=1",
                         "callbacks.loss_curve=null")
    tok = ImageTokenizer.from_pretrained(TOKENIZERS_DIR / "shapes")
    recoloured = recoloured_codes(cfg.data, tok, 256)
    images = ShapesImages(seed=0, image_size=64, split="train", length=256, recolour=True)
    assert torch.equal(recoloured[:3], tok.encode(torch.stack([images[i] for i in range(3)])).flatten(1))
    train(cfg)
    features = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
        "model.image_codes.features"]
    plain = ChameleonDataModule(cfg.data, tokenizer_dir=cfg.tokenizer.dir, seed=cfg.seed).train_image_codes()
    measured = torch.zeros(512, dtype=torch.bool)
    measured[torch.cat([plain.flatten(), recoloured.flatten()])] = True
    assert torch.equal(features[:, -1] == 1, measured)
    assert (measured.sum() > plain.unique().numel())  # codes the plain images never use are measured too
    with pytest.raises(ConfigError, match="data=jsonl has no palette to swap"):
        recoloured_codes(OmegaConf.create({"source": "jsonl"}), tok, 4)


def test_appearance_recolour_on_free_image_rows_says_it_does_nothing(tiny_train_cfg, caplog):
    with caplog.at_level("WARNING", logger="chameleon_lite.cli.train"):
        train(tiny_train_cfg("appearance_recolour=true", "trainer.max_steps=1", "callbacks.loss_curve=null"))
    assert "appearance_recolour=true has no effect with model.image_code_embed=free" in caplog.text


def test_a_plain_model_does_not_initialise_an_appearance_run(tiny_train_cfg, tmp_path):
    result = train(tiny_train_cfg("trainer.max_steps=2", "export_weights=true", "callbacks.loss_curve=null"))
    with pytest.raises(CheckpointError, match="model.image_code_embed=.appearance. here, .free. there"):
        train(tiny_train_cfg("model.image_code_embed=appearance", f"init_from={result['weights']}",
                             f"run_dir={tmp_path / 'second'}"))


def test_quantize_wants_the_baked_model():
    from chameleon_lite.generation.quantize import quantize_int8

    with pytest.raises(ValueError, match="load it with checkpoint.load_model"):
        quantize_int8(appearance_model().eval())
    plain = ChameleonLM(dataclasses.replace(appearance_model().cfg, image_code_embed="free")).eval()
    assert quantize_int8(plain) is not plain
