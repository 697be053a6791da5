"""Next-token cross-entropy with Chameleon's z-loss, in float32 whatever the logits' dtype.

Two entry points with one definition of the loss:

- `lm_loss(logits, labels)`: from (B, T, V) logits (evaluation, and any caller that has logits).
- `head_loss(hidden, head_weight, labels)`: the output head fused in (training): the (N, V) logits are
  made, used and dropped one chunk of rows at a time, and the gradients of the hidden states and of the
  head weight are computed in the same pass (the loss is the graph's end, so they are known then up to
  the upstream scalar, which backward applies). No (N, V) tensor exists at any time, in any dtype.
"""

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
    max_abs_logit: Tensor | None = None  # (B, T) float32: largest |logit| of each position (`head_loss` only)


# Rows per chunk of the float32 working copy: ~4 M elements (16 MB) whatever the vocab size, small enough to
# stay in the allocator's heap (glibc maps blocks > 32 MB freshly, and first-touch page faults then cost
# as much as the arithmetic), large enough that `head_loss`'s per-chunk head matmuls run at full speed
# (512 rows at vocab 8,192: 200 ms fused head + loss per 2,048-token bf16 step; 256 rows: 202; 1,024: 213).
_CHUNK_ELEMENTS = 1 << 22


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
            log_z[start:end] = _chunk_log_z(work[: end - start].copy_(logits[start:end]))[0]
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


def _chunk_log_z(x: Tensor, peak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log Z = log sum exp over the last dim of the float32 chunk `x` (rows, V), and the sum S with
    Z = S exp(peak). `x` is overwritten with exp(x - peak), so softmax(x) = x / S. `peak` (rows, 1): the
    row maxima, when the caller has them."""
    if peak is None:
        peak = x.amax(dim=-1, keepdim=True)  # (rows, 1): exp never overflows, the peak's term is 1
    sums = x.sub_(peak).exp_().sum(dim=-1)
    return sums.log().add_(peak[:, 0]), sums


def _count_labels(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(counted (B, T) bool, n_tokens int64 scalar, labels with ignored ones set to 0); refuses a batch
    with nothing to count."""
    counted = labels != ignore_index
    n_tokens = counted.sum()
    if int(n_tokens) == 0:
        raise ValueError(
            f"lm_loss got no label to count: all {labels.numel()} labels equal ignore_index={ignore_index} "
            "(is the batch all padding / prompt, or were labels masked twice?)"
        )
    return counted, n_tokens, labels.masked_fill(~counted, 0)


class _HeadCrossEntropy(torch.autograd.Function):
    """logits = hidden @ weight.T, then cross-entropy + z-loss averaged over the counted rows, chunk by chunk.

    Forward, per chunk of rows: logits in the compute dtype (bf16 under autocast), a float32 copy for
    log Z, the token cross-entropies and the largest |logit| (the stability monitor), then the gradient
    d loss / d logits = (p (1 + 2 c log Z) - onehot(label)) / n on counted rows (p = softmax, c = the
    z-loss coefficient, n = counted rows), cast to the compute dtype and pushed through the head at once:
    grad_hidden[chunk] = g @ W, grad_weight += g.T @ h (float32 sum). Backward multiplies both by the
    upstream gradient of the loss. Compared with head + `lm_loss`: no (N, V) logits or gradient in
    memory, each chunk's exp computed once instead of twice, the same matmul FLOPs.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, counted: Tensor, n_tokens: Tensor,
                z_loss_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows = max(1, min(n, _CHUNK_ELEMENTS // vocab))
        work = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)  # reused by every chunk
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        token_ce = torch.empty_like(log_z)
        max_abs = torch.empty_like(log_z)
        grad_hidden = torch.empty(n, hidden.shape[1], dtype=dtype, device=hidden.device) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        inv_n = 1.0 / n_tokens.float()
        for start in range(0, n, rows):
            end = min(n, start + rows)
            x = work[: end - start]
            if dtype == torch.float32:
                torch.mm(h[start:end], w.T, out=x)
            else:
                x.copy_(h[start:end] @ w.T)  # (rows, V) logits in the compute dtype, reduced in float32
            peak = x.amax(dim=-1)  # (two reductions: torch.aminmax is ~40x slower than amax on CPU)
            torch.maximum(peak, x.amin(dim=-1).neg_(), out=max_abs[start:end])
            label_logit = x.gather(1, labels[start:end, None])[:, 0]
            chunk_log_z, sums = _chunk_log_z(x, peak[:, None])  # x now holds exp(logit - peak) = p * sums
            log_z[start:end] = chunk_log_z
            token_ce[start:end] = chunk_log_z - label_logit
            if need_grad:
                live = counted[start:end].float() * inv_n  # 1/n on counted rows, 0 on ignored ones
                x.mul_((live * (1.0 + 2.0 * z_loss_coef * chunk_log_z) / sums)[:, None])
                x.scatter_add_(1, labels[start:end, None], -live[:, None])
                grad = x.to(dtype)
                torch.mm(grad, w, out=grad_hidden[start:end])
                grad_weight += grad.T @ h[start:end]
        token_ce.mul_(counted)
        log_z.mul_(counted)
        ce = token_ce.sum() * inv_n
        z_loss = z_loss_coef * log_z.square().sum() * inv_n
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(ce, z_loss, token_ce, max_abs)
        return ce + z_loss, ce, z_loss, token_ce, max_abs

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = (grad_hidden * grad_loss).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def head_loss(hidden: Tensor, head_weight: Tensor, labels: Tensor, z_loss_coef: float = 1e-5,
              ignore_index: int = -100) -> LMLoss:
    """`lm_loss(hidden @ head_weight.T, labels)` with the head fused in (see `_HeadCrossEntropy`).

    hidden: (B, T, dim) final-normed hidden states (`ChameleonLM.hidden_states`); head_weight:
    (V, dim), `lm_head.weight`. Under autocast the head runs in the autocast dtype, as in the model.
    Returns `LMLoss` whose `loss` carries the gradient (ce and z_loss are detached parts for logging)
    plus `max_abs_logit` (B, T). Same value and gradients as head + `lm_loss` within rounding.
    """
    counted, n_tokens, safe_labels = _count_labels(labels, ignore_index)
    loss, ce, z_loss, token_ce, max_abs = _HeadCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), head_weight, safe_labels.reshape(-1), counted.reshape(-1), n_tokens,
        z_loss_coef)
    return LMLoss(loss=loss, ce=ce, z_loss=z_loss, token_ce=token_ce.view_as(labels), n_tokens=n_tokens,
                  max_abs_logit=max_abs.view_as(labels))


def lm_loss(logits: Tensor, labels: Tensor, z_loss_coef: float = 1e-5, ignore_index: int = -100) -> LMLoss:
    """Mean cross-entropy over counted labels plus z_loss_coef * mean(log^2 Z).

    logits: (B, T, V) any float dtype; labels: (B, T) int64, already aligned with logits (the label
    at t is the token after input t), `ignore_index` where no loss is taken. Z = sum_v exp(logit_v);
    the z-loss keeps log Z near 0 so bf16 logits do not drift (Chameleon, arXiv 2405.09818 sec. 3).
    Raises ValueError if every label is `ignore_index` (the mean would be 0/0).
    """
    counted, n_tokens, safe_labels = _count_labels(labels, ignore_index)
    token_ce, log_z = _TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), safe_labels.reshape(-1))
    token_ce = token_ce.view_as(labels).masked_fill(~counted, 0.0)
    log_z = log_z.view_as(labels).masked_fill(~counted, 0.0)
    ce = token_ce.sum() / n_tokens
    z_loss = z_loss_coef * log_z.square().sum() / n_tokens
    return LMLoss(loss=ce + z_loss, ce=ce, z_loss=z_loss, token_ce=token_ce, n_tokens=n_tokens)
