"""VQModel shapes at every stage, config validation, presets (shapes, chameleon_512), weight export."""

import dataclasses

import pytest
import torch
import yaml

from chameleon_lite.config import CONF_DIR
from chameleon_lite.vq.config import VQConfig, VQConfigError
from chameleon_lite.vq.model import VQModel

TINY = VQConfig(image_size=32, base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                latent_channels=16, norm_groups=8, codebook_size=32, embed_dim=4)


def preset(name: str) -> VQConfig:
    return VQConfig.from_dict(yaml.safe_load((CONF_DIR / "vq" / f"{name}.yaml").read_text())["model"])


@pytest.mark.parametrize("mid_attention", [True, False])
def test_tensor_shapes_through_the_network(mid_attention):
    cfg = dataclasses.replace(TINY, mid_attention=mid_attention)
    model = VQModel(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert cfg.downsample_factor == 4 and cfg.grid_size == 8 and cfg.tokens_per_image == 64
    latent = model.encoder(x)
    assert latent.shape == (2, 16, 8, 8)
    z = model.quant_conv(latent)
    assert z.shape == (2, 4, 8, 8)
    quant = model.quantize(z)
    assert quant.quantized.shape == (2, 4, 8, 8) and quant.indices.shape == (2, 8, 8)
    assert model.post_quant_conv(quant.quantized).shape == (2, 16, 8, 8)
    recon, out = model(x)
    assert recon.shape == (2, 3, 32, 32) and out.indices.shape == (2, 8, 8)
    assert model.decode_indices(out.indices).shape == (2, 3, 32, 32)


def test_patch_encoder_codes_depend_only_on_their_own_patch():
    cfg = dataclasses.replace(TINY, encoder="patch")
    model = VQModel(cfg).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = model.encoder(x)
        assert latent.shape == (2, 16, 8, 8)
        changed = x.clone()
        changed[:, :, 4:8, 8:12] = -changed[:, :, 4:8, 8:12]  # every pixel of patch (row 1, col 2)
        diff = (model.encoder(changed) - latent).abs().amax(dim=1)  # (B, 8, 8)
    assert bool((diff[:, 1, 2] > 0).all())
    diff[:, 1, 2] = 0
    assert float(diff.max()) == 0.0  # no other position moved: no spatial mixing anywhere
    # Identical patches (a blank canvas) get one code, wherever they are.
    with torch.no_grad():
        codes = model(torch.ones(1, 3, 32, 32))[1].indices
    assert codes.unique().numel() == 1


def test_conv_encoder_mixes_neighbours():  # the contrast that motivates encoder=patch
    model = VQModel(TINY).eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    changed = x.clone()
    changed[:, :, 4:8, 8:12] = -changed[:, :, 4:8, 8:12]
    with torch.no_grad():
        diff = (model.encoder(changed) - model.encoder(x)).abs().amax(dim=1)
    assert int((diff > 0).sum()) > 1


def test_unknown_encoder_is_refused():
    with pytest.raises(VQConfigError, match="vq.model.encoder"):
        dataclasses.replace(TINY, encoder="vit")


def test_gradients_reach_encoder_decoder_and_codebook():
    model = VQModel(TINY).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = model(x)
    ((recon - x).abs().mean() + quant.loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "post_quant_conv.weight", "decoder.conv_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_shapes_preset_is_64px_f8_64_tokens_and_small():
    cfg = preset("shapes")
    assert (cfg.image_size, cfg.downsample_factor, cfg.grid_size, cfg.tokens_per_image) == (64, 8, 8, 64)
    assert 256 <= cfg.codebook_size <= 1024 and cfg.l2_normalize and cfg.embed_dim <= 16
    n_params = sum(t.numel() for t in VQModel(cfg).export_state_dict().values())
    assert n_params * 4 <= 5_000_000  # fp32 safetensors stays under 5 MB


def test_chameleon_512_preset_geometry():
    cfg = preset("chameleon_512")
    assert (cfg.image_size, cfg.downsample_factor, cfg.codebook_size, cfg.embed_dim) == (512, 16, 8192, 256)
    assert cfg.grid_size == 32 and cfg.tokens_per_image == 1024


def test_config_errors_name_the_key():
    with pytest.raises(VQConfigError, match="image_size = 30 is not divisible"):
        dataclasses.replace(TINY, image_size=30)
    with pytest.raises(VQConfigError, match="norm_groups"):
        dataclasses.replace(TINY, norm_groups=5)
    with pytest.raises(VQConfigError, match=r"unknown vq.model key\(s\) \['codebok_size'\]"):
        VQConfig.from_dict({**TINY.to_dict(), "codebok_size": 3})
    with pytest.raises(VQConfigError, match="ema_decay"):
        dataclasses.replace(TINY, ema_decay=1.5)
    assert VQConfig.from_dict(TINY.to_dict()) == TINY


def test_export_state_leaves_out_training_buffers_and_round_trips():
    model = VQModel(TINY)
    state = model.export_state_dict()
    assert not any(k.startswith("quantize.") and k != "quantize.embedding.weight" for k in state)
    other = VQModel(TINY)
    other.load_export_state_dict(state)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value)
    with pytest.raises(ValueError, match="do not match"):
        VQModel(dataclasses.replace(TINY, codebook_size=64)).load_export_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        other.load_export_state_dict({k: v for k, v in state.items() if k != "decoder.conv_out.weight"})
