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


# Rows per chunk of the float32 working copy: ~2 M elements (8 MB) whatever the vocab size, small enough to
# stay in the allocator's heap (glibc maps blocks > 32 MB freshly, and first-touch page faults then cost
# as much as the arithmetic) and in the L3 cache of a small CPU.
_CHUNK_ELEMENTS = 1 << 21


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy and log-partition of (N, V) logits, in float32 chunks of rows.

    Forward returns token_ce = log Z - logit[label] and log Z, each (N,), from a float32 logsumexp of
    each chunk, and saves only the logits (in their own dtype, bf16 under autocast) and log Z. Backward
    rebuilds each chunk's probabilities exp(logit - log Z) in float32 and writes the gradient straight
    into the logits' dtype: d token_ce / d logits = p - onehot(label), d log Z / d logits = p. No (N, V)
    float32 tensor ever exists: autograd's version would hold the float32 probabilities (4 bytes per
    logit) and copy the whole gradient between dtypes, and the vocabulary axis is the largest activation
    of a small model (2 x 24 ms of copies per step at 2,048 tokens x 8,192 ids on the 2-core CPU).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        n, vocab = logits.shape
        rows = ctx.rows = max(1, min(n, _CHUNK_ELEMENTS // vocab))
        work = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)  # reused by every chunk
        log_z = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            x = work[: end - start].copy_(logits[start:end])
            peak = x.amax(dim=-1, keepdim=True)  # (rows, 1): exp never overflows, the peak's term is 1
            log_z[start:end] = x.sub_(peak).exp_().sum(dim=-1).log_().add_(peak[:, 0])
        label_logit = logits.gather(1, labels[:, None])[:, 0].float()
        ctx.save_for_backward(logits, labels, log_z)
        return log_z - label_logit, log_z

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_log_z: Tensor) -> tuple[Tensor, None]:
        logits, labels, log_z = ctx.saved_tensors
        n, vocab = logits.shape
        rows = ctx.rows
        work = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        scale = grad_ce + grad_log_z  # (N,): d/d logits = scale * p - grad_ce * onehot(label)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            probs = work[: end - start].copy_(logits[start:end]).sub_(log_z[start:end, None]).exp_()
            probs.mul_(scale[start:end, None]).scatter_add_(1, labels[start:end, None], -grad_ce[start:end, None])
            grad[start:end] = probs
        return grad, None


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
