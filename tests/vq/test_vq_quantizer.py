"""Quantizer: beta on the encoder term, straight-through gradient, codebook remedies, usage meters."""

import math

import pytest
import torch

from chameleon_lite.vq.quantizer import CodebookUsage, VectorQuantizer, code_perplexity


def plain_quantizer(**changes) -> VectorQuantizer:
    options = {"codebook_size": 16, "embed_dim": 4, "beta": 0.25, "l2_normalize": False, "ema_decay": None,
                   "dead_code_restart": False}
    return VectorQuantizer(**{**options, **changes})


def test_shapes_and_index_range():
    torch.manual_seed(0)
    vq = plain_quantizer()
    out = vq(torch.randn(3, 4, 5, 6))
    assert out.quantized.shape == (3, 4, 5, 6)
    assert out.indices.shape == (3, 5, 6) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 16
    assert out.loss.ndim == 0
    # the forward value is the chosen code
    assert torch.allclose(out.quantized, vq.lookup(out.indices), atol=1e-6)


def test_beta_weights_the_encoder_term_not_the_codebook_term():
    torch.manual_seed(0)
    beta = 0.25
    vq = plain_quantizer(beta=beta)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    q = vq.lookup(out.indices).detach()
    n = z.numel()
    # d/dz of beta * mean((z - sg(q))^2) = beta * 2 (z - q) / n
    assert torch.allclose(z.grad, beta * 2 * (z.detach() - q) / n, atol=1e-6)
    # d/de of mean((e - sg(z))^2), summed over the positions that chose e: weight 1, not beta
    expected = torch.zeros_like(vq.embedding.weight)
    flat_z = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    flat_q = q.permute(0, 2, 3, 1).reshape(-1, 4)
    expected.index_add_(0, out.indices.flatten(), 2 * (flat_q - flat_z) / n)
    assert torch.allclose(vq.embedding.weight.grad, expected, atol=1e-6)
    assert torch.allclose(out.loss, beta * out.commitment + out.codebook)


def test_straight_through_passes_the_gradient_unchanged():
    vq = plain_quantizer()
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    (vq(z).quantized * 3.0).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))


def test_l2_lookup_uses_unit_vectors():
    torch.manual_seed(0)
    vq = plain_quantizer(l2_normalize=True)
    out = vq(torch.randn(2, 4, 3, 3) * 7.0)
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)
    assert torch.allclose(vq.codebook().norm(dim=1), torch.ones(16), atol=1e-5)


def collapsed_quantizer(**changes) -> VectorQuantizer:
    """Code 0 at the data, every other code far away: only code 0 is ever chosen."""
    vq = plain_quantizer(**changes)
    with torch.no_grad():
        vq.embedding.weight.copy_(100.0 + torch.randn(16, 4))
        vq.embedding.weight[0] = 0.0
    if vq.ema_decay is not None:
        vq.ema_embed_sum.copy_(vq.embedding.weight)
    return vq


def run_small(vq: VectorQuantizer, steps: int) -> int:
    """A few training steps on N(0, 1) data; returns how many codes the final batch uses."""
    torch.manual_seed(1)
    opt = torch.optim.SGD([p for p in vq.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)],
                          lr=0.5)
    vq.train()
    for _ in range(steps):
        out = vq(torch.randn(8, 4, 4, 4, requires_grad=True))  # stands in for encoder outputs
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vq.eval()
    return int(vq(torch.randn(8, 4, 4, 4)).indices.unique().numel())


def test_dead_code_restart_revives_unused_codes():
    without = run_small(collapsed_quantizer(), steps=12)
    revived = collapsed_quantizer(dead_code_restart=True, dead_code_window=3)
    with_restart = run_small(revived, steps=12)
    assert without == 1
    assert with_restart >= 14
    assert float(revived.embedding.weight.detach().abs().max()) < 50  # the far codes were moved onto the data


def test_restart_candidates_favour_badly_served_outputs():
    """The ring buffer samples encoder outputs in proportion to their quantization error, so a
    dominant, perfectly coded input (a blank background) does not crowd out the rest."""
    vq = plain_quantizer(dead_code_restart=True, dead_code_window=1000, restart_buffer_size=64)
    with torch.no_grad():
        vq.embedding.weight.zero_()  # every code sits exactly on the zero vector
    z = torch.zeros(1, 4, 20, 20)  # 400 outputs: 390 served perfectly by the codebook ...
    z[0, :, 0, :10] = 5.0  # ... and 10 far from every code
    vq.train()
    torch.manual_seed(0)
    vq(z)
    remembered = vq.recent[: int(vq.recent_filled)]
    assert remembered.shape[0] == 8  # capacity // 8 per step
    assert bool((remembered == 5.0).all())  # uniform sampling would pick ~0.2 of them


def test_ema_codebook_follows_the_data_and_restarts_too():
    vq = collapsed_quantizer(ema_decay=0.5, dead_code_restart=True, dead_code_window=3)
    assert not vq.embedding.weight.requires_grad
    used = run_small(vq, steps=12)
    assert used >= 14
    out = vq(torch.randn(1, 4, 2, 2))
    assert float(out.codebook) == 0.0  # EMA updates replace the codebook loss


def test_usage_over_a_rolling_window_of_a_hand_made_stream():
    meter = CodebookUsage(codebook_size=8, window=2)
    meter.update(torch.tensor([0, 1, 1]))
    assert meter.usage() == 2 / 8
    meter.update(torch.tensor([[1, 2], [3, 3]]))
    assert meter.usage() == 4 / 8  # {0, 1, 2, 3}
    meter.update(torch.tensor([4]))
    assert meter.usage() == 4 / 8  # the first update left the window: {1, 2, 3, 4}
    assert meter.counts.tolist() == [0, 1, 1, 2, 1, 0, 0, 0]
    meter.update(torch.tensor([5, 6, 7]))
    assert meter.usage() == 4 / 8 and math.isclose(meter.perplexity(), 4.0)  # {4, 5, 6, 7}, uniform
    whole = CodebookUsage(codebook_size=8)
    for batch in ([0], [1], [2], [2]):
        whole.update(torch.tensor(batch))
    assert whole.usage() == 3 / 8
    with pytest.raises(ValueError, match="outside a codebook of 8"):
        whole.update(torch.tensor([8]))


def test_perplexity_extremes():
    assert math.isclose(code_perplexity(torch.ones(32)), 32.0)
    assert math.isclose(code_perplexity(torch.tensor([0, 9, 0, 0])), 1.0)
    assert code_perplexity(torch.zeros(4)) == 0.0


def test_an_empty_batch_makes_the_same_collectives_as_a_full_one(monkeypatch):
    """Under DDP a rank whose batch lost every image must still join the quantizer's collectives (dead-code
    broadcast, EMA and hit all-reduces), in the same order and shapes as the ranks that quantized images,
    or the next collective pairs with the wrong one (a hang). Recorded with a stand-in for torch.distributed."""
    from chameleon_lite.vq import quantizer as module

    calls = []
    monkeypatch.setattr(module, "_distributed", lambda: True)
    monkeypatch.setattr(module.dist, "all_reduce", lambda t, *a, **k: calls.append(("all_reduce", tuple(t.shape))))
    monkeypatch.setattr(module.dist, "broadcast", lambda t, *a, **k: calls.append(("broadcast", tuple(t.shape))))
    for ema in (None, 0.9):
        full = collapsed_quantizer(ema_decay=ema, dead_code_restart=True, dead_code_window=1).train()
        empty = collapsed_quantizer(ema_decay=ema, dead_code_restart=True, dead_code_window=1).train()
        z = torch.randn(2, 4, 3, 3)
        for step in range(3):  # from step 1 on dead codes restart: the broadcast is part of the sequence
            empty.recent_filled.copy_(full.recent_filled)  # what decides a restart is in step on every rank
            empty.steps_since_hit.copy_(full.steps_since_hit)
            calls.clear()
            full(z)
            expected = list(calls)
            calls.clear()
            empty.empty_step()
            assert calls == expected, (ema, step)
        assert expected[0][0] == "broadcast"
