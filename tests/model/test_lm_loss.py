"""lm_loss: cross-entropy and z-loss values, ignored labels, float32 math on bf16 logits."""

import math

import pytest
import torch

from chameleon_lite.model import head_loss, lm_loss


def test_hand_computed_ce_and_z_loss():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])  # Z = 4 and 2e
    labels = torch.tensor([[1, 0]])
    out = lm_loss(logits, labels, z_loss_coef=0.1)
    ce = [math.log(4.0) - math.log(3.0), math.log(2.0)]  # log Z - logit[label]
    z = 0.1 * (math.log(4.0) ** 2 + (1.0 + math.log(2.0)) ** 2) / 2
    assert out.ce.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(ce) / 2 + z, rel=1e-6)
    torch.testing.assert_close(out.token_ce, torch.tensor([ce]))
    assert out.n_tokens.item() == 2


def test_ignored_labels_count_nowhere():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    out = lm_loss(logits, labels)
    assert out.n_tokens.item() == 7
    assert (out.token_ce[0, :3] == 0).all()
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce, expected)


def test_bf16_logits_are_reduced_in_float32():
    logits = torch.randn(2, 7, 300).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (2, 7))
    out = lm_loss(logits, labels)
    assert out.loss.dtype == torch.float32 and out.token_ce.dtype == torch.float32
    torch.testing.assert_close(out.ce, lm_loss(logits.detach().float(), labels).ce)
    out.loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_all_ignored_labels_raise_naming_the_cause():
    with pytest.raises(ValueError, match="no label to count"):
        lm_loss(torch.randn(1, 3, 5), torch.full((1, 3), -100))


@pytest.mark.parametrize("chunk_elements", [1 << 21, 100], ids=["one-chunk", "rows-in-chunks-of-2"])
def test_gradient_matches_autograd_of_the_definition(monkeypatch, chunk_elements):
    monkeypatch.setattr("chameleon_lite.model.loss._CHUNK_ELEMENTS", chunk_elements)  # 100 // 50 = 2 rows
    logits = torch.randn(3, 4, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4))
    labels[1, 2] = -100
    lm_loss(logits, labels, z_loss_coef=0.3).loss.backward()

    reference = logits.detach().clone().requires_grad_()
    counted = labels != -100
    log_z = reference.logsumexp(-1)[counted]
    target = reference.gather(-1, labels.clamp(min=0)[..., None])[..., 0][counted]
    ((log_z - target).mean() + 0.3 * log_z.square().mean()).backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_confidently_wrong_rows_stay_finite():
    logits = torch.zeros(1, 2, 4)
    logits[0, :, 0] = 200.0  # p[label] = exp(-200) underflows float32
    out = lm_loss(logits, torch.tensor([[1, 0]]), z_loss_coef=0.0)
    torch.testing.assert_close(out.token_ce, torch.tensor([[200.0, 0.0]]))


# ----------------------------------------------------------------------------------------- head_loss
@pytest.mark.parametrize("chunk_elements", [1 << 21, 100], ids=["one-chunk", "rows-in-chunks-of-2"])
def test_fused_head_loss_equals_head_then_lm_loss(monkeypatch, chunk_elements):
    """Value, per-token parts, max |logit| and the gradients of hidden states and head weight, with an
    ignored label, z-loss and an upstream scale (DDP's token-share rescale multiplies the loss)."""
    monkeypatch.setattr("chameleon_lite.model.loss._CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4))
    labels[1, 2] = -100
    fused = head_loss(hidden, weight, labels, z_loss_coef=0.3)
    (2.5 * fused.loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    reference = lm_loss(logits, labels, z_loss_coef=0.3)
    (2.5 * reference.loss).backward()
    for name in ("loss", "ce", "z_loss", "token_ce", "n_tokens"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), msg=name)
    torch.testing.assert_close(fused.max_abs_logit, logits.detach().abs().amax(-1))
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    assert not fused.ce.requires_grad and fused.loss.requires_grad


def test_fused_head_loss_under_bf16_autocast_runs_the_head_in_bf16():
    """Under autocast the head matmuls run in bf16 as in the model; gradients come back in the inputs'
    float32 and agree with the unfused bf16 head + lm_loss to bf16 rounding."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, 32, requires_grad=True)
    weight = (0.1 * torch.randn(300, 32)).requires_grad_()
    labels = torch.randint(0, 300, (2, 64))
    grads = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (head_loss(hidden, weight, labels) if fused
                   else lm_loss(torch.nn.functional.linear(hidden, weight), labels))
        out.loss.backward()
        grads.append((out.loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    assert grads[0][1].dtype == grads[0][2].dtype == torch.float32
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_fused_head_loss_without_grad_computes_no_gradient():
    hidden, weight = torch.randn(1, 5, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (1, 5))
    with torch.no_grad():
        out = head_loss(hidden, weight, labels)
    torch.testing.assert_close(out.loss, lm_loss(hidden @ weight.T, labels).loss)
    with pytest.raises(ValueError, match="no label to count"):
        head_loss(hidden, weight, torch.full((1, 5), -100))
