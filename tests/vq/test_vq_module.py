"""VQModule: a 30-step CPU run lowers the loss; the PatchGAN term switches on at disc_start."""

import lightning as L
import torch
from torch.utils.data import DataLoader

from chameleon_lite.vq.data import ShapesImages, collate_images
from chameleon_lite.vq.module import VQModule, to_model_range

TINY_MODEL = {"image_size": 32, "base_channels": 16, "channel_multipliers": [1, 2, 2], "num_res_blocks": 1,
                  "latent_channels": 16, "norm_groups": 8, "codebook_size": 32, "embed_dim": 4, "dead_code_window": 10}


def reconstruction_loss(module: VQModule, images: torch.Tensor) -> float:
    module.model.eval()
    with torch.no_grad():
        x = to_model_range(images)
        recon, _ = module.model(x)
        return float((recon - x).abs().mean() + (recon - x).pow(2).mean())


def test_thirty_cpu_steps_lower_the_loss(tmp_path):
    L.seed_everything(0)
    data = ShapesImages(seed=0, image_size=32, split="train", length=64)
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_images)
    held_out = torch.stack([ShapesImages(0, 32, "val", 16)[i] for i in range(16)])
    module = VQModule(model=TINY_MODEL, lr=2e-3, warmup_steps=5)
    before = reconstruction_loss(module, held_out)
    module.model.train()
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 30
    after = reconstruction_loss(module, held_out)
    assert after < 0.6 * before, (before, after)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/psnr", "train/usage", "train/perplexity", "train/commitment"):
        assert key in logged, key
    assert 0.0 < float(logged["train/usage"]) <= 1.0


def test_adversarial_term_starts_at_disc_start():
    torch.manual_seed(0)
    module = VQModule(model=TINY_MODEL, loss={"disc_weight": 0.5, "disc_start": 3, "disc_layers": 2,
                                               "disc_channels": 8})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quant = module.model(x)
    _, before = module.loss(x, recon, quant, step=2)
    assert float(before["disc"]) == 0.0 and float(before["generator_adv"]) == 0.0
    total, after = module.loss(x, recon, quant, step=3)
    assert float(after["disc"]) > 0.0
    total.backward()
    assert module.loss.discriminator.net[0].weight.grad.abs().sum() > 0
    assert module.model.decoder.conv_out.weight.grad.abs().sum() > 0


def test_generator_and_discriminator_each_get_only_their_own_gradient():
    torch.manual_seed(0)
    module = VQModule(model=TINY_MODEL, loss={"disc_weight": 1.0, "disc_layers": 2, "disc_channels": 8})
    disc = module.loss.discriminator
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    generator_adv, disc_loss = module.loss._adversarial(x, recon, active=True)
    generator_adv.backward(retain_graph=True)
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    recon.grad = None
    disc_loss.backward()
    assert recon.grad is None
    assert all(p.grad is not None for p in disc.parameters())
