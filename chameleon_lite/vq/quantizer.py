"""Vector quantizer with the codebook-usage remedies, and the usage/perplexity meters.

Loss (van den Oord et al. 2017, with ``beta`` on the *encoder* term)::

    loss = beta * ||sg(q) - z||^2  +  ||q - sg(z)||^2
           ^ commitment: pulls the encoder   ^ codebook: pulls the code (dropped with EMA updates)

taming-transformers' default ``legacy=True`` (and HF's ``ChameleonVQVAEVectorQuantizer``) put
``beta`` on the codebook term instead; tests pin the gradients to the formula above. The
forward value is the code ``q``; the gradient reaches ``z`` unchanged (straight-through).

Remedies against codebook collapse, all switchable in :class:`~chameleon_lite.vq.config.VQConfig`:

* ``l2_normalize``: look codes up by cosine similarity in a low-dimensional space (LlamaGen).
* ``ema_decay``: codebook = exponential moving average of the encoder outputs assigned to it.
* ``dead_code_restart``: a code not hit for ``dead_code_window`` training steps is re-seeded with
  an encoder output drawn from a ring buffer of recent ones, remembered with probability
  proportional to their quantization error (k-means++ style: outputs the codebook already serves
  well, such as the blank background that fills most shapes-world patches, rarely become new
  codes, so restarted codes go where they reduce the error). Under ``torch.distributed`` the hit
  counts are all-reduced and rank 0's replacements broadcast, so every rank keeps the same codebook.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    """``quantized`` (B, D, h, w) codes with straight-through gradient; ``indices`` (B, h, w) int64;
    ``loss`` = ``beta * commitment + codebook`` (scalar); the two terms unweighted, for logging."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment: Tensor
    codebook: Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-code lookup of a (B, D, h, w) map into ``codebook_size`` codes of dimension ``embed_dim``.

    Training-only state (hit ages, recent-output ring buffer, EMA statistics) is kept in buffers so
    Lightning checkpoints resume exactly; :attr:`TRAINING_STATE` names them so weight exports can
    leave them out.
    """

    TRAINING_STATE = ("steps_since_hit", "recent", "recent_filled", "recent_pos", "ema_cluster_size",
                      "ema_embed_sum")

    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25, l2_normalize: bool = True,
                 ema_decay: float | None = None, dead_code_restart: bool = True, dead_code_window: int = 50,
                 restart_buffer_size: int = 4096) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.ema_decay = ema_decay
        self.dead_code_restart = dead_code_restart
        self.dead_code_window = dead_code_window
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        if l2_normalize:
            nn.init.normal_(self.embedding.weight)
        else:
            nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("steps_since_hit", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(restart_buffer_size, embed_dim))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long))
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        self.last_restarted = 0

    # ------------------------------------------------------------------------------------ lookup
    def codebook(self) -> Tensor:
        """(K, D) code vectors as used for lookup (unit norm when ``l2_normalize``)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_normalize else weight

    def nearest(self, z_flat: Tensor) -> Tensor:
        """Index (N,) of the nearest code for each row of ``z_flat`` (N, D), already normalised if l2.

        Rows are searched in chunks so the (rows, K) score matrix stays below 2**26 entries.
        """
        codes = self.codebook().to(z_flat.dtype)
        norms = codes.pow(2).sum(-1)
        rows = max(1, (1 << 26) // self.codebook_size)
        found = []
        for chunk in z_flat.split(rows):
            scores = chunk @ codes.t()  # (rows, K)
            if self.l2_normalize:
                found.append(scores.argmax(-1))
            else:  # squared distance, same formula (and rounding) as taming / HF
                found.append((chunk.pow(2).sum(-1, keepdim=True) + norms - 2 * scores).argmin(-1))
        return torch.cat(found)

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors for an integer (B, h, w) grid -> (B, D, h, w)."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    # ----------------------------------------------------------------------------------- forward
    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` (B, D, h, w). In training mode also updates EMA codes and restarts dead ones.

        Runs in float32 even under autocast: a bf16 nearest-neighbour search flips assignments.
        """
        b, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"VectorQuantizer: input has {d} channels, codebook dimension is {self.embed_dim}")
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z, b, d, h, w)

    def _quantize(self, z: Tensor, b: int, d: int, h: int, w: int) -> QuantizerOutput:
        if self.training and self.dead_code_restart:
            self._restart_dead_codes()  # before the codebook enters this step's autograd graph
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D)
        if self.l2_normalize:
            z_flat = F.normalize(z_flat, dim=-1)
        with torch.no_grad():
            indices = self.nearest(z_flat)  # (N,)
        if self.training and self.ema_decay is not None:
            self._ema_update(z_flat.detach(), indices)
        q_flat = F.embedding(indices, self.codebook())  # (N, D)
        commitment = F.mse_loss(z_flat, q_flat.detach())
        codebook = F.mse_loss(q_flat, z_flat.detach()) if self.ema_decay is None else z_flat.new_zeros(())
        loss = self.beta * commitment + codebook
        q_flat = z_flat + (q_flat - z_flat).detach()  # straight-through estimator
        quantized = q_flat.view(b, h, w, d).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        if self.training and self.dead_code_restart:
            self._track_hits(z_flat.detach(), indices, (q_flat - z_flat).detach().pow(2).sum(-1))
        return QuantizerOutput(quantized, indices.view(b, h, w), loss, commitment, codebook)

    # ---------------------------------------------------------------------- codebook maintenance
    @torch.no_grad()
    def empty_step(self) -> None:
        """The codebook side of a training step whose batch held no image (every file of it was bad): the
        collectives `forward` makes (dead-code broadcast, EMA and hit all-reduces) with nothing counted, so
        DDP ranks stay in step, and the same ageing of codes; a no-op outside training."""
        if not self.training:
            return
        if self.dead_code_restart:
            self._restart_dead_codes()
        weight = self.embedding.weight
        if self.ema_decay is not None:
            self._ema_apply(weight.new_zeros(self.codebook_size), weight.new_zeros(self.codebook_size, self.embed_dim))
        if self.dead_code_restart:
            self._age_codes(torch.zeros(self.codebook_size, dtype=torch.long, device=weight.device))

    @torch.no_grad()
    def _ema_update(self, z_flat: Tensor, indices: Tensor) -> None:
        onehot = F.one_hot(indices, self.codebook_size).to(z_flat.dtype)  # (N, K)
        self._ema_apply(onehot.sum(0), onehot.t() @ z_flat)  # (K,), (K, D)

    def _ema_apply(self, counts: Tensor, sums: Tensor) -> None:
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        eps = 1e-5
        smoothed = (self.ema_cluster_size + eps) / (total + self.codebook_size * eps) * total  # Laplace
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _track_hits(self, z_flat: Tensor, indices: Tensor, errors: Tensor) -> None:
        """Age every code by one step, reset the age of codes hit now; remember some encoder outputs."""
        self._remember(z_flat, errors)
        self._age_codes(torch.bincount(indices, minlength=self.codebook_size))

    def _age_codes(self, hits: Tensor) -> None:
        if _distributed():
            dist.all_reduce(hits)
        self.steps_since_hit.add_(1).masked_fill_(hits > 0, 0)

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Re-seed codes not hit for ``dead_code_window`` steps with remembered encoder outputs."""
        dead = (self.steps_since_hit >= self.dead_code_window).nonzero().squeeze(1)
        if dead.numel() == 0 or int(self.recent_filled) == 0:
            self.last_restarted = 0
            return
        self.last_restarted = int(dead.numel())
        pick = torch.randint(int(self.recent_filled), (dead.numel(),), device=dead.device)
        new_codes = self.recent[pick].clone()
        if _distributed():
            dist.broadcast(new_codes, src=0)
        self.embedding.weight[dead] = new_codes
        if self.ema_decay is not None:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new_codes
        self.steps_since_hit[dead] = 0

    def _remember(self, z_flat: Tensor, errors: Tensor) -> None:
        """Write some of this step's encoder outputs into the ring buffer ``recent``, drawn without
        replacement with probability proportional to their squared quantization error ``errors`` (N,)."""
        capacity = self.recent.shape[0]
        take = min(z_flat.shape[0], max(1, capacity // 8))
        weights = errors.float() + 1e-12  # all-zero errors (a perfect codebook) fall back to uniform
        rows = z_flat[torch.multinomial(weights, take, replacement=False)]
        slots = (self.recent_pos + torch.arange(take, device=z_flat.device)) % capacity
        self.recent[slots] = rows.to(self.recent.dtype)
        self.recent_pos.copy_((self.recent_pos + take) % capacity)
        self.recent_filled.clamp_(min=min(capacity, int(self.recent_filled) + take))


def code_perplexity(counts: Tensor) -> float:
    """``exp(entropy)`` of a code histogram: K for uniform use of K codes, 1 for a single code."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(math.exp(float(entropy)))


class CodebookUsage:
    """Histogram of the codes hit over the last ``window`` updates (all updates when ``window`` is None).

    ``usage()`` is the fraction of the codebook hit at least once in the window, ``perplexity()``
    the exponentiated entropy of the windowed histogram.
    """

    def __init__(self, codebook_size: int, window: int | None = None) -> None:
        self.codebook_size = codebook_size
        self.window = window
        self._history: deque[Tensor] = deque()
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: Tensor) -> None:
        """Add a batch of code indices (any shape, values in ``[0, codebook_size)``)."""
        hist = torch.bincount(indices.detach().flatten().cpu(), minlength=self.codebook_size)
        if hist.numel() > self.codebook_size:
            raise ValueError(f"CodebookUsage: index {int(indices.max())} outside a codebook of "
                             f"{self.codebook_size} codes")
        self.counts += hist
        if self.window is not None:
            self._history.append(hist)
            if len(self._history) > self.window:
                self.counts -= self._history.popleft()

    def usage(self) -> float:
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        return code_perplexity(self.counts)

    def reset(self) -> None:
        self._history.clear()
        self.counts.zero_()
