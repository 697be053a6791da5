"""Next-token cross-entropy with Chameleon's z-loss, in float32 whatever the logits' dtype."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LMLoss(NamedTuple):
    """`loss` = `ce` + `z_loss` (what to backpropagate); the parts are kept for logging.

    loss, ce, z_loss: float32 scalars. token_ce: (B, T) float32, 0 at ignored positions (per-modality
    logging masks it by the labels' modality). n_tokens: int64 scalar, the counted labels.
    """

    loss: Tensor
    ce: Tensor
    z_loss: Tensor
    token_ce: Tensor
    n_tokens: Tensor


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy and log-partition of (N, V) logits from one float32 softmax.

    Forward returns token_ce = log Z - logit[label] and log Z, each (N,), and keeps only the
    probabilities; log Z is read at each row's argmax, where p >= 1/V, so its log is exact (no
    underflow, unlike log p[label] for a confidently wrong row). Backward scales the saved probabilities
    in place and scatters the label term: d token_ce / d logits = p - onehot(label), d log Z / d logits
    = p. That is one pass over (N, V) in backward where autograd's logsumexp + gather takes four and a
    zero-filled buffer; the vocabulary axis is the largest activation of a small model. (Backward runs
    once: a second one, retain_graph=True, is refused by autograd's saved-tensor version check.)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, V)
        peak = probs.argmax(dim=-1, keepdim=True)  # (N, 1); argmax of bf16 logits is 4x slower on CPU
        log_z = logits.gather(1, peak)[:, 0].float() - probs.gather(1, peak)[:, 0].log()
        token_ce = log_z - logits.gather(1, labels[:, None])[:, 0].float()
        ctx.save_for_backward(probs, labels)
        ctx.logits_dtype = logits.dtype
        return token_ce, log_z

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_log_z: Tensor) -> tuple[Tensor, None]:
        probs, labels = ctx.saved_tensors
        grad = probs.mul_((grad_ce + grad_log_z)[:, None])  # (N, V), in place
        grad.scatter_add_(1, labels[:, None], -grad_ce[:, None])
        return grad.to(ctx.logits_dtype), None


def lm_loss(logits: Tensor, labels: Tensor, z_loss_coef: float = 1e-5, ignore_index: int = -100) -> LMLoss:
    """Mean cross-entropy over counted labels plus z_loss_coef * mean(log^2 Z).

    logits: (B, T, V) any float dtype; labels: (B, T) int64, already aligned with logits (the label
    at t is the token after input t), `ignore_index` where no loss is taken. Z = sum_v exp(logit_v);
    the z-loss keeps log Z near 0 so bf16 logits do not drift (Chameleon, arXiv 2405.09818 sec. 3).
    Raises ValueError if every label is `ignore_index` (the mean would be 0/0).
    """
    counted = labels != ignore_index  # (B, T)
    n_tokens = counted.sum()
    if int(n_tokens) == 0:
        raise ValueError(
            f"lm_loss got no label to count: all {labels.numel()} labels equal ignore_index={ignore_index} "
            "(is the batch all padding / prompt, or were labels masked twice?)"
        )
    safe_labels = labels.masked_fill(~counted, 0).reshape(-1)
    token_ce, log_z = _TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), safe_labels)  # (B*T,)
    token_ce = token_ce.view_as(labels).masked_fill(~counted, 0.0)
    log_z = log_z.view_as(labels).masked_fill(~counted, 0.0)
    ce = token_ce.sum() / n_tokens
    z_loss = z_loss_coef * log_z.square().sum() / n_tokens
    return LMLoss(loss=ce + z_loss, ce=ce, z_loss=z_loss, token_ce=token_ce, n_tokens=n_tokens)
