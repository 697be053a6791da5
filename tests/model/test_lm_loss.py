"""lm_loss: cross-entropy and z-loss values, ignored labels, float32 math on bf16 logits."""

import math

import pytest
import torch

from chameleon_lite.model import lm_loss


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
