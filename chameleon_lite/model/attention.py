"""Attention plumbing: rotary embeddings, the KV cache, one mask factory per backend, and `attend`.

The backend is one string, `attn_impl` (as in facebookresearch/lingua):

- `"sdpa"`: `F.scaled_dot_product_attention`, CPU and GPU. Plain causal rows use `is_causal=True`;
  packed rows use a dense boolean document-causal mask `(B, 1, T, T)` built once per forward
  (`sdpa_mask`); PyTorch's CPU flash kernel takes a mask in forward and backward.
- `"xformers"`: `xformers.ops.memory_efficient_attention`, CUDA only. Packed rows are flattened to
  batch 1 and masked with `BlockDiagonalCausalMask` (`xformers_mask`), so no T x T mask exists.

Decoding (a `KVCache` or left-padded `token_mask`) always goes through SDPA with the dense mask of
`sdpa_mask`: the query is short, and the valid key slots are arbitrary, which no xformers bias models.

Shapes: B batch, T new tokens, S key slots, H query heads, G key/value heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

AttnMask = Any  # None (plain causal), a bool Tensor (B, 1, T, S) (sdpa), or an xformers AttentionBias


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoPE tables for integer `positions` (B, T) -> cos and signed sin, each float32 (B, T, 1, D).

    Frequencies theta^(-2i/D) as in LLaMA/HF, in HF's "half" layout: channel i pairs with i + D/2, so
    q/k projection weights copy to and from HF unchanged (HF permutes Meta's interleaved weights into
    it). The sin table carries rotate_half's sign: [-sin, sin]. The singleton axis broadcasts over heads.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, :, None], torch.cat((-sin, sin), dim=-1)[:, :, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, H, D) by the tables of `rope_tables`: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = [-x2, x1] is a roll by D/2 with the sign already in `sin` (3 kernels, not 7)."""
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, dims=-1), sin.to(x.dtype))


def check_doc_lens(doc_lens: Tensor, batch: int, seq_len: int) -> None:
    """Raise ValueError unless `doc_lens` is an integer (B, max_docs) tensor whose rows sum to T."""
    if doc_lens.dim() != 2 or doc_lens.shape[0] != batch or doc_lens.dtype.is_floating_point:
        raise ValueError(
            f"doc_lens must be an integer tensor (B={batch}, max_docs), zero-padded; got "
            f"{tuple(doc_lens.shape)} {doc_lens.dtype}"
        )
    sums = doc_lens.sum(dim=1)
    if bool((sums != seq_len).any()) or bool((doc_lens < 0).any()):
        raise ValueError(
            f"each row of doc_lens must be non-negative and sum to the row length T={seq_len}; row sums are "
            f"{sums.tolist()} (does the packer count every token, padding included, in some document?)"
        )


def document_ids(doc_lens: Tensor, seq_len: int) -> Tensor:
    """Index of the document each token belongs to: (B, max_docs) lengths -> (B, T) int64."""
    ends = doc_lens.cumsum(dim=1)  # (B, N), exclusive end of each document
    t = torch.arange(seq_len, device=doc_lens.device).expand(doc_lens.shape[0], seq_len).contiguous()
    return torch.searchsorted(ends, t, right=True)


def document_positions(doc_lens: Tensor, seq_len: int) -> Tensor:
    """RoPE positions restarting at 0 in every document: (B, max_docs) lengths -> (B, T) int64."""
    ids = document_ids(doc_lens, seq_len)  # (B, T)
    starts = doc_lens.cumsum(dim=1) - doc_lens  # (B, N)
    return torch.arange(seq_len, device=doc_lens.device) - starts.gather(1, ids)


def sdpa_mask(
    seq_len: int, doc_lens: Tensor | None = None, key_valid: Tensor | None = None, past_len: int | Tensor = 0
) -> Tensor | None:
    """Mask factory of the `sdpa` backend: True = may attend. Returns None for plain causal rows.

    - `doc_lens` (B, N): document-causal (B, 1, T, T); a token sees earlier tokens of its own document.
    - `key_valid` (B, S >= past_len + T): decoding. The T queries sit in slots [past_len, past_len + T); a
      query sees the valid slots up to and including its own. `past_len` may be a 0-dim tensor. It always sees its own slot, even an invalid (padding)
      one, so no row is fully masked (a fully masked row gives NaN that would leak through P @ V).
    """
    if doc_lens is not None:
        ids = document_ids(doc_lens, seq_len)  # (B, T)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_lens.device).tril()
        return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    if key_valid is not None:
        q_slot = past_len + torch.arange(seq_len, device=key_valid.device)  # (T,)
        k_slot = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
        own = k_slot[None, :] == q_slot[:, None]
        return ((causal & key_valid[:, None, :]) | own)[:, None]  # (B, 1, T, S)
    return None


def xformers_ops(device: torch.device) -> ModuleType:
    """Import `xformers.ops` lazily, refusing CPU tensors or a missing install with the fix."""
    if device.type != "cuda":
        raise RuntimeError(
            f"attn_impl='xformers' runs only on CUDA tensors, got {device.type} tensors: "
            "use model.attn_impl=sdpa on this device"
        )
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise RuntimeError(
            "attn_impl='xformers' needs the xformers package (pip install xformers matching your torch): "
            "or use model.attn_impl=sdpa"
        ) from err
    return xops


def xformers_mask(doc_lens: Tensor | None, device: torch.device) -> AttnMask:
    """Mask factory of the `xformers` backend.

    Packed rows: one `BlockDiagonalCausalMask` over all documents of the batch, flattened to batch 1
    (this reads `doc_lens` on the host once per forward). Plain rows: `LowerTriangularMask`.
    """
    xops = xformers_ops(device)
    if doc_lens is None:
        return xops.LowerTriangularMask()
    lens = [n for n in doc_lens.flatten().tolist() if n > 0]  # row-major = flattened token order
    return xops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lens, device=device)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, attn_impl: str, dropout_p: float) -> Tensor:
    """Softmax attention with scale 1/sqrt(D): q (B, T, H, D), k and v (B, S, G, D) -> (B, T, H, D).

    G may divide H (grouped-query attention: query head h reads k/v head h // (H / G)).
    `mask` comes from the backend's factory; `sdpa` with mask None means plain causal.
    """
    if attn_impl == "xformers":
        xops = xformers_ops(q.device)
        batch, seq_len, n_heads, head_dim = q.shape
        if torch.is_autocast_enabled(q.device.type):  # autocast casts SDPA's inputs, not xformers': QK-norm
            dtype = torch.get_autocast_dtype(q.device.type)  # leaves q, k in float32 beside a bf16 v
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if k.shape[2] != n_heads:  # xformers' GQA layout is forward-only: expand k/v to H heads
            k = k.repeat_interleave(n_heads // k.shape[2], dim=2)
            v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
        if isinstance(mask, xops.fmha.attn_bias.BlockDiagonalCausalMask):  # packed: flatten to batch 1
            q, k, v = (t.reshape(1, batch * seq_len, n_heads, head_dim) for t in (q, k, v))
        try:
            y = xops.memory_efficient_attention(q, k, v, attn_bias=mask, p=dropout_p)
        except NotImplementedError as err:  # e.g. a wheel built for another torch / CUDA: no kernel loads
            raise RuntimeError(
                f"xformers has no attention kernel for these inputs ({q.dtype}, head_dim {head_dim}, "
                f"torch {torch.__version__}); a wheel built for another torch or CUDA cannot load its kernels "
                "(`python -m xformers.info` shows what is available): install the xformers build that matches "
                "your torch, or use model.attn_impl=sdpa"
            ) from err
        return y.view(batch, seq_len, n_heads, head_dim)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D), (B, G, S, D)
        attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=k.shape[2] != q.shape[2],
    )  # (B, H, T, D)
    return y.transpose(1, 2)


@dataclass
class KVCache:
    """Static, preallocated keys and values for incremental decoding.

    `k`, `v`: one (B, G, max_len, D) tensor per layer; `valid`: (B, max_len) bool, False for left padding
    and unwritten slots; `length`: slots written so far. A forward of T tokens writes slots
    [length, length + T) in every layer, attends to valid slots < length + T causally, then
    advances `length` by T. `image_run` (B,) counts the image codes each row has fed since its last
    non-image token, so a model with `image_pos_embed` places each new code in its image's grid.
    Callers left-pad prompts of different lengths (`token_mask` False) and give each row positions
    counting from its first real token. (Separate tensors per layer, not
    one stacked tensor: under torch.compile an in-place write into a view of a stacked input is
    functionalised into a copy of the whole stack, 45 ms per step at 32 rows.)

    `length` is an int (prefill: attention reads the written slots only) or, after `fix_shapes`, a
    0-dim int64 tensor advanced in place: every forward then writes with `index_copy_` and attends to all
    max_len slots under the mask, so each decode step has the same shapes and values-only inputs, and one
    `torch.compile` graph serves every step. Slots past max_len then fail in `index_copy_`, not in a
    bounds check (which would read the length back to the host): size the cache for the whole run.
    """

    k: list[Tensor]
    v: list[Tensor]
    valid: Tensor
    length: int | Tensor = 0
    image_run: Tensor | None = None  # (B,) int64: image codes at the end of each row so far (image_pos_embed)
    length_buffer: Tensor | None = None  # 0-dim int64 that `fix_shapes` reuses (a fixed address: CUDA graphs)

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def fix_shapes(self) -> None:
        """Keep `length` as a device tensor from now on (see the class docstring): `length_buffer`, made
        on first use, so a cache reset and reused keeps every tensor at the same address."""
        if not isinstance(self.length, Tensor):
            if self.length_buffer is None:
                self.length_buffer = torch.zeros((), dtype=torch.long, device=self.valid.device)
            self.length = self.length_buffer.fill_(self.length)

    def reset(self) -> None:
        """Empty the cache for another run of the same shape, in place (old keys and values stay behind
        the validity mask, never read)."""
        self.valid.zero_()
        if self.image_run is not None:
            self.image_run.zero_()
        self.length = 0

    def slots(self, n_new: int) -> Tensor:
        """Slot indices [length, length + n_new) of the next write, as a tensor (fixed shapes only)."""
        return self.length + torch.arange(n_new, device=self.valid.device)

    def mark_valid(self, new_valid: Tensor) -> Tensor:
        """Record which of the next T slots hold real tokens, ``new_valid`` (B, T) bool (False = left
        padding); return the (B, S) validity attention reads, S as in `update`. Refuses a write past
        max_len (int length only; see the class docstring)."""
        n_new = new_valid.shape[1]
        if isinstance(self.length, Tensor):
            return self.valid.index_copy_(1, self.slots(n_new), new_valid)
        end = self.length + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n_new} tokens > max_len={self.max_len}")
        self.valid[:, self.length : end] = new_valid
        return self.valid[:, :end]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new k, v (B, T, G, D) at [length, length + T); return the (B, S, G, D) slots
        attention reads: S = length + T, or max_len with fixed shapes."""
        if isinstance(self.length, Tensor):
            slots = self.slots(k.shape[1])
            self.k[layer].index_copy_(2, slots, k.transpose(1, 2))
            self.v[layer].index_copy_(2, slots, v.transpose(1, 2))
            return self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2)
        end = self.length + k.shape[1]
        self.k[layer][:, :, self.length : end] = k.transpose(1, 2)
        self.v[layer][:, :, self.length : end] = v.transpose(1, 2)
        return self.k[layer][:, :, :end].transpose(1, 2), self.v[layer][:, :, :end].transpose(1, 2)
