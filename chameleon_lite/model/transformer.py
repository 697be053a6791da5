"""ChameleonLM: one decoder-only transformer over the unified text + image-code vocabulary.

embed -> n_layers x Block[RMSNorm, attention (QK-norm, RoPE), RMSNorm, SwiGLU] -> RMSNorm -> lm_head

State-dict layout (HF interop maps these; fused weights split along dim 0):

- `layers.{i}.attention.qkv_proj.weight` (H*D + 2*G*D, dim): rows [q | k | v], each head-major
  (head h owns rows h*D:(h+1)*D of its part), RoPE channels in HF's "half" layout, so HF's
  `q_proj`, `k_proj`, `v_proj` are `weight.split([H*D, G*D, G*D])` unchanged.
- `layers.{i}.attention.qk_norm.{q_weight,q_bias}`: (D,) shared or (H, D) per head (HF's
  `q_norm.{weight,bias}`); `k_weight`, `k_bias` likewise with G heads (HF's `k_norm`).
- `layers.{i}.feed_forward.gate_up_proj.weight` (2F, dim): rows [gate | up] = HF `gate_proj`, `up_proj`.
- `layers.{i}.attn_norm`, `layers.{i}.ffn_norm`: the RMSNorm of each branch (HF `input_layernorm`,
  `post_attention_layernorm`); pre-norm, or applied to the branch output with `swin_norm`.
- `image_row_embed.weight`, `image_col_embed.weight` (image_grid, dim): only with `image_pos_embed`
  (2-D positions of image codes; HF's Chameleon has none, so such a model does not export to HF).
- `image_codes.{features,embed_proj,head_proj}`: only with `image_code_embed=appearance`, whose image-code
  rows of `embed_tokens.weight` and `lm_head.weight` are unused, or `free+appearance`, whose rows add to them
  (`code_appearance.bake_state` writes the rows the two give into them: the exported model is a plain one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from chameleon_lite.model.attention import (
    AttnMask,
    KVCache,
    apply_rope,
    attend,
    check_doc_lens,
    document_positions,
    rope_tables,
    sdpa_mask,
    xformers_mask,
)
from chameleon_lite.model.code_appearance import CodeAppearance, appearance_rows, image_code_rows
from chameleon_lite.model.config import ModelConfig


class QKNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over head_dim, with weight and bias, of every q and k head.

    Applied to the q and k heads side by side, (B, T, H + G, D), in one normalisation and one affine
    kernel. Statistics are per token and head; the affine part is shared, (D,), or per head, (H, D) and
    (G, D) (HF's layout). Per-head weights that are all equal give exactly the shared result.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, per_head: bool, eps: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.eps = n_heads, n_kv_heads, eps
        self.q_weight = nn.Parameter(torch.ones((n_heads, head_dim) if per_head else (head_dim,)))
        self.q_bias = nn.Parameter(torch.zeros_like(self.q_weight))
        self.k_weight = nn.Parameter(torch.ones((n_kv_heads, head_dim) if per_head else (head_dim,)))
        self.k_bias = nn.Parameter(torch.zeros_like(self.k_weight))

    def forward(self, qk: Tensor) -> Tensor:
        head_dim = qk.shape[-1]
        q_shape, k_shape = (self.n_heads, head_dim), (self.n_kv_heads, head_dim)
        weight = torch.cat((self.q_weight.expand(q_shape), self.k_weight.expand(k_shape))).to(qk.dtype)
        bias = torch.cat((self.q_bias.expand(q_shape), self.k_bias.expand(k_shape))).to(qk.dtype)
        return torch.addcmul(bias, F.layer_norm(qk, (head_dim,), eps=self.eps), weight)  # (B, T, H + G, D)


class Attention(nn.Module):
    """Causal self-attention with fused QKV, optional QK-norm (before RoPE), GQA and a KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.qk_norm = (
            QKNorm(self.n_heads, self.n_kv_heads, self.head_dim, cfg.qk_norm_per_head, cfg.norm_eps)
            if cfg.qk_norm
            else nn.Identity()
        )
        self.dropout_p = cfg.attn_dropout

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, attn_impl: str, kv_cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        H, G = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * G, self.head_dim)
        qk, v = qkv.split([H + G, G], dim=2)  # q and k heads side by side: (B, T, H + G, D); v (B, T, G, D)
        qk = apply_rope(self.qk_norm(qk), cos, sin)  # QK-norm before RoPE, q and k in one call each
        q, k = qk.split([H, G], dim=2)  # (B, T, H, D), (B, T, G, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, S, G, D), S = cached + T
        y = attend(q, k, v, mask, attn_impl, self.dropout_p if self.training else 0.0)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, H * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x)). Swin-norm (Chameleon-34B): x + norm(attn(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttnMask, attn_impl: str, kv_cache: KVCache | None
    ) -> Tensor:
        if self.swin_norm:
            x = x + self.resid_dropout(self.attn_norm(self.attention(x, cos, sin, mask, attn_impl, kv_cache)))
            return x + self.resid_dropout(self.ffn_norm(self.feed_forward(x)))
        x = x + self.resid_dropout(self.attention(self.attn_norm(x), cos, sin, mask, attn_impl, kv_cache))
        return x + self.resid_dropout(self.feed_forward(self.ffn_norm(x)))


class ChameleonLM(nn.Module):
    """Early-fusion decoder over one vocabulary of text tokens and image codes.

    Init: every Linear/Embedding weight ~ N(0, init_std); the residual-branch output projections
    (`o_proj`, `down_proj`) ~ N(0, init_std / sqrt(2 * n_layers)) so the residual stream's variance
    does not grow with depth (GPT-2 / LLaMA practice); norms start at weight 1, bias 0.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.image_pos_embed:
            self.image_row_embed = nn.Embedding(cfg.image_grid, cfg.dim)
            self.image_col_embed = nn.Embedding(cfg.image_grid, cfg.dim)
        if cfg.image_code_embed != "free":
            start, end = cfg.image_ids
            self.image_codes = CodeAppearance(end - start, cfg.image_code_features, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise all weights as described in the class docstring."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CodeAppearance):
                module.reset_parameters(self.cfg.init_std)
            elif isinstance(module, QKNorm):
                for weight, bias in ((module.q_weight, module.q_bias), (module.k_weight, module.k_bias)):
                    nn.init.ones_(weight)
                    nn.init.zeros_(bias)

    def forward(
        self,
        input_ids: Tensor,
        *,
        logits_to_keep: int | None = None,
        return_hidden: bool = False,
        vocab_slice: slice | None = None,
        **inputs: Tensor | KVCache | None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Next-token logits for `input_ids` (B, T) int64.

        inputs: `positions`, `doc_lens`, `kv_cache`, `token_mask`, as in `hidden_states`.
        logits_to_keep: compute logits for the last k positions only (sampling needs the last one).
        return_hidden: also return the final-normed hidden states (B, T, dim) the head reads.
        vocab_slice: compute logits for the ids in this contiguous range only (a view of the head's
            rows, no copy): a decode step whose rows may only draw text ids, or only image codes, skips
            the rest of the head. The last dim of the logits is then the slice's length.

        Returns logits (B, T or logits_to_keep, vocab) in the compute dtype (bf16 under bf16 autocast),
        or (logits, hidden).
        """
        hidden = self.hidden_states(input_ids, **inputs)
        hidden_kept = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
        if vocab_slice is None:
            logits = self.lm_head(hidden_kept) if self.cfg.image_code_embed == "free" else F.linear(
                hidden_kept, self.head_weight())
        elif isinstance(self.lm_head, nn.Linear):
            logits = F.linear(hidden_kept, self.head_weight()[vocab_slice])
        else:  # a head with its own row selection (generation.quantize.Int8Linear)
            logits = self.lm_head.rows(hidden_kept, vocab_slice)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_lens: Tensor | None = None,
        kv_cache: KVCache | None = None,
        token_mask: Tensor | None = None,
    ) -> Tensor:
        """The final-normed hidden states (B, T, dim) the head reads (training feeds them to
        `model.loss.head_loss`, which applies the head chunk by chunk; `forward` to the head).

        positions: (B, T) RoPE positions. Default: 0..T-1; per-document 0.. restarts with `doc_lens`;
            kv_cache.length + 0..T-1 with a cache (left-padded rows must pass their own).
        doc_lens: (B, max_docs) zero-padded document lengths of packed rows, each row summing to T.
            Attention then never crosses a document boundary.
        kv_cache: decode incrementally: write this step's k/v at slots [length, length + T), attend to
            the valid cached slots, advance `length` by T (see `KVCache`).
        token_mask: (B, T) bool, False = left padding: those slots are never attended to.
        """
        T = input_ids.shape[1]
        mask, attn_impl, positions = self._attention_inputs(input_ids, positions, doc_lens, kv_cache, token_mask)
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        if self.cfg.image_code_embed != "free":
            x = self._appearance_embedding(input_ids, x)
        if self.cfg.image_pos_embed:
            x = x + self.image_position_embedding(input_ids, positions, kv_cache)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)  # (B, T, 1, D)
        for block in self.layers:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, attn_impl, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, attn_impl, kv_cache)
        hidden = self.norm(x)  # (B, T, dim)
        if kv_cache is not None:
            kv_cache.length += T
        return hidden

    def head_weight(self) -> Tensor:
        """The head's weight (vocab, dim) as the logits use it: ``lm_head.weight``, with the image codes' rows
        from their appearance under ``image_code_embed=appearance`` (added to the free rows: ``free+appearance``)."""
        weight = self.lm_head.weight
        if self.cfg.image_code_embed == "free":
            return weight
        return image_code_rows(weight, self.cfg, appearance_rows(self.image_codes.features, self.image_codes.head_proj))

    def _appearance_embedding(self, input_ids: Tensor, x: Tensor) -> Tensor:
        """``x`` (the free rows' embedding) with every image code's embedding from its appearance (replaced, or
        added with ``free+appearance``)."""
        start, end = self.cfg.image_ids
        is_image = (input_ids >= start) & (input_ids < end)
        rows = appearance_rows(self.image_codes.features, self.image_codes.embed_proj)
        looks = F.embedding((input_ids - start).clamp(0, end - start - 1), rows)
        if self.cfg.image_code_embed == "free+appearance":
            looks = x.float() + looks
        return torch.where(is_image[..., None], looks.to(x.dtype), x)

    def image_position_embedding(self, input_ids: Tensor, positions: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Row + column embedding of each image code's cell in its image's code grid, 0 elsewhere: (B, T, dim).

        An image is a run of consecutive image-code ids (raster order) inside one document, so a code's
        cell is the number of image codes before it in its run, found from the ids and RoPE `positions`
        (a document starts at position 0) by cumulative counts: packed rows, prompts and decoding need no
        extra input. With a KV cache, runs continue across calls: the cache carries each row's current run
        length (`KVCache.image_run`). A run longer than a grid (the sampler closes an image after grid^2
        codes) keeps the last cell's embedding.
        """
        start, end = self.cfg.image_ids
        grid = self.cfg.image_grid
        is_image = (input_ids >= start) & (input_ids < end)  # (B, T)
        breaks = ~is_image | (positions == 0)  # a run starts after a non-image token or at a document start
        count = is_image.long().cumsum(dim=1)  # image codes in this call up to and including t
        before_run = torch.where(breaks, count - is_image.long(), 0).cummax(dim=1).values
        index = count - before_run - 1  # the cell of each image code (>= 0 on image tokens)
        if kv_cache is not None:
            unbroken = breaks.long().cummax(dim=1).values == 0  # still in the run the last call ended in
            index = index + torch.where(unbroken, kv_cache.image_run[:, None], 0)
            kv_cache.image_run.copy_(torch.where(is_image[:, -1], index[:, -1] + 1, 0))
        index = index.clamp(0, grid * grid - 1)
        embedding = self.image_row_embed(index // grid) + self.image_col_embed(index % grid)  # (B, T, dim)
        return embedding * is_image[..., None]

    def _attention_inputs(
        self,
        input_ids: Tensor,
        positions: Tensor | None,
        doc_lens: Tensor | None,
        kv_cache: KVCache | None,
        token_mask: Tensor | None,
    ) -> tuple[AttnMask, str, Tensor]:
        """The mask (from the backend's factory), the backend, and the positions, once per forward.

        Decoding (`kv_cache`) and left padding (`token_mask`) use SDPA's dense mask whatever
        `attn_impl` says; with a cache, this also marks the new slots valid (or as `token_mask` says).
        """
        B, T = input_ids.shape
        attn_impl, past = self.cfg.attn_impl, 0
        if kv_cache is not None:
            if doc_lens is not None:
                raise ValueError("doc_lens (packed training rows) cannot be combined with kv_cache (decoding)")
            past = kv_cache.length
            new_valid = torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None else token_mask
            mask, attn_impl = sdpa_mask(T, key_valid=kv_cache.mark_valid(new_valid), past_len=past), "sdpa"
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > model.max_seq_len={self.cfg.max_seq_len}")
        elif doc_lens is not None:
            if token_mask is not None:
                raise ValueError("doc_lens and token_mask cannot be combined: packed rows carry no padding")
            check_doc_lens(doc_lens, B, T)
            positions = document_positions(doc_lens, T) if positions is None else positions
            mask = xformers_mask(doc_lens, input_ids.device) if attn_impl == "xformers" else sdpa_mask(T, doc_lens)
        elif token_mask is not None:
            mask, attn_impl = sdpa_mask(T, key_valid=token_mask), "sdpa"
        else:
            mask = xformers_mask(None, input_ids.device) if attn_impl == "xformers" else None  # plain causal
        if positions is None:
            positions = (past + torch.arange(T, device=input_ids.device)).expand(B, T)
        return mask, attn_impl, positions

    def compile_blocks(self) -> None:
        """Regional compilation: each decoder block through ``torch.compile`` (fixed shapes). The blocks
        share their code, so one graph (forward and backward) serves every layer; embedding, head and loss
        stay eager, parameter names are unchanged (`chameleon-train compile=true`)."""
        for block in self.layers:
            block.compile(dynamic=False)

    def init_kv_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty `KVCache` for `batch_size` rows of up to `max_len` slots (prompt + generated +
        left padding); device and dtype default to the model's parameters'."""
        weight = self.embed_tokens.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        shape = (batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.cfg.n_layers)],
            valid=torch.zeros(batch_size, max_len, device=device, dtype=torch.bool),
            image_run=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once. `exclude_embeddings` drops the input token
        embedding table, the image row/column tables and the appearance embedding map (lookups, no FLOPs); an untied `lm_head` is a matmul and stays counted."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.cfg.image_pos_embed:
                n -= self.image_row_embed.weight.numel() + self.image_col_embed.weight.numel()
            if self.cfg.image_code_embed != "free":
                n -= self.image_codes.embed_proj.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), PaLM-style:

            6 * N + 6 * n_layers * dim * seq_len

        N = parameters excluding the input embedding table, plus vocab * dim for the head matmul when
        the embedding is tied (the head is then not a separate parameter but still a matmul). Norm
        parameters are included (negligible). The attention term counts QK^T and AV (2 matmuls x
        2 FLOPs x dim per key) over seq_len / 2 keys on average (causal), times 3:
        12 * n_layers * dim * seq_len / 2. Packed rows are counted as if fully causal.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.cfg.vocab_size * self.cfg.dim
        return 6.0 * n + 6.0 * self.cfg.n_layers * self.cfg.dim * seq_len
