"""`ModelConfig`: the single source of a ChameleonLM's shape, and its YAML presets.

Presets live in `conf/model/<name>.yaml` (the Hydra `model` group) as plain data; they are validated
into this dataclass, so a typo in a preset or on the command line (`model.n_heads=5`) fails here with
a message naming the key and the fix, not deep inside `nn.Linear`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
ATTN_IMPLS = ("sdpa", "xformers")
IMAGE_CODE_EMBEDS = ("free", "appearance", "free+appearance")


class ModelConfigError(ValueError):
    """A model configuration value is missing, of the wrong type, or inconsistent with another."""


@dataclass
class ModelConfig:
    """Shape and numerics of a Chameleon-style decoder-only transformer.

    `vocab_size` may be None while a config travels through Hydra: the training code fills it from the
    tokenizers' `UnifiedVocab` before building the model (`ChameleonLM` refuses a None vocab).
    Every other field is checked on construction; see `validate`.
    """

    vocab_size: int | None
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain multi-head)
    ffn_dim: int | None = None  # SwiGLU hidden width; None = llama rule, see `ffn_hidden_dim`
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True  # LayerNorm over head_dim on q and k before RoPE (Chameleon's stabiliser)
    qk_norm_per_head: bool = False  # QK-norm weights (n_heads, head_dim), HF's layout, vs shared (head_dim,)
    swin_norm: bool = False  # Chameleon-34B: x = x + norm(attn(x)); x = x + norm(ffn(x))
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    tie_embeddings: bool = False
    attn_impl: str = "sdpa"  # "sdpa" (CPU + GPU, dense doc-causal mask) | "xformers" (CUDA, block-diagonal)
    grad_checkpointing: bool = False  # recompute each block's activations in backward
    init_std: float = 0.02
    # 2-D positions of image codes (not in Chameleon, whose image codes carry only the 1-D RoPE position):
    # learned row and column embeddings added to every image-code token's input embedding.
    image_pos_embed: bool = False
    image_grid: int | None = None  # code-grid side (8 for 64x64 images at f=8); filled by the training code
    image_ids: list[int] | None = None  # [start, end): the image-code id block; filled by the training code
    # "free": a learnt embedding row and head row per image code (Chameleon); "appearance": both are learnt linear
    # maps of what the code looks like (`model.code_appearance`), a training-time parametrisation baked on export;
    # "free+appearance": the sum of the two.
    image_code_embed: str = "free"
    image_code_features: int | None = None  # appearance features per code; filled by the training code

    def __post_init__(self) -> None:
        self.validate(require_vocab=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads, `n_kv_heads` resolved (None means one per query head)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width: `ffn_dim`, or llama's rule 2/3 * 4 * dim rounded up to a multiple of
        min(256, dim // 4) (dim 4096 -> 11008 as in LLaMA/Chameleon-7B; dim 256 -> 704)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        multiple_of = min(256, max(self.dim // 4, 1))
        hidden = int(2 * 4 * self.dim / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    def validate(self, require_vocab: bool = True) -> None:
        """Raise `ModelConfigError` naming the offending `model.<field>` and how to fix it.

        `require_vocab=False` accepts `vocab_size=None` (a preset before the vocabulary is known).
        """
        if self.vocab_size is None:
            if require_vocab:
                raise ModelConfigError(
                    "model.vocab_size is None: set it to the unified vocabulary's size "
                    "(the training code does this from the tokenizers; by hand: model.vocab_size=<int>)"
                )
        else:
            _check_int(self, "vocab_size", minimum=1)
        for name in ("dim", "n_layers", "n_heads", "max_seq_len"):
            _check_int(self, name, minimum=1)
        if self.n_kv_heads is not None:
            _check_int(self, "n_kv_heads", minimum=1)
        if self.ffn_dim is not None:
            _check_int(self, "ffn_dim", minimum=1)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _check_float(self, name, low=0.0, low_inclusive=False)
        for name in ("attn_dropout", "resid_dropout"):
            _check_float(self, name, low=0.0, low_inclusive=True, high=1.0)
        for name in ("qk_norm", "qk_norm_per_head", "swin_norm", "tie_embeddings", "grad_checkpointing",
                     "image_pos_embed"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"model.{name}={getattr(self, name)!r} must be true or false")

        if self.dim % self.n_heads:
            raise ModelConfigError(
                f"model.n_heads={self.n_heads} does not divide model.dim={self.dim}: "
                "choose n_heads so that dim % n_heads == 0"
            )
        if self.head_dim % 2:
            raise ModelConfigError(
                f"head_dim = model.dim / model.n_heads = {self.head_dim} is odd; RoPE rotates pairs of "
                "channels: choose dim and n_heads so that dim / n_heads is even"
            )
        if self.n_heads % self.kv_heads:
            raise ModelConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                "grouped-query attention shares each k/v head by n_heads / n_kv_heads query heads"
            )
        if self.qk_norm_per_head and not self.qk_norm:
            raise ModelConfigError(
                "model.qk_norm_per_head=true needs model.qk_norm=true (there is no QK-norm to lay out per head)"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ModelConfigError(f"model.attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        self._validate_image_fields(require_vocab)

    def _validate_image_fields(self, require_vocab: bool) -> None:
        if self.image_grid is not None:
            _check_int(self, "image_grid", minimum=1)
        if self.image_ids is not None:
            ids = self.image_ids
            if (not isinstance(ids, (list, tuple)) or len(ids) != 2 or not all(isinstance(i, int) for i in ids)
                    or not 0 <= ids[0] < ids[1] or (self.vocab_size is not None and ids[1] > self.vocab_size)):
                raise ModelConfigError(
                    f"model.image_ids={ids!r} must be [start, end), 0 <= start < end <= vocab_size "
                    f"({self.vocab_size}): the id block of the image codes in the unified vocabulary"
                )
            self.image_ids = [int(ids[0]), int(ids[1])]
        if self.image_code_embed not in IMAGE_CODE_EMBEDS:
            raise ModelConfigError(f"model.image_code_embed={self.image_code_embed!r} is not one of {IMAGE_CODE_EMBEDS}")
        if self.image_code_features is not None:
            _check_int(self, "image_code_features", minimum=1)
        if self.image_code_embed != "free":
            if self.tie_embeddings:
                raise ModelConfigError(f"model.image_code_embed={self.image_code_embed} gives the image codes' input and "
                                       "output rows their own maps, which a tied head cannot hold: set "
                                       "model.tie_embeddings=false")
            if require_vocab and (self.image_ids is None or self.image_code_features is None):
                raise ModelConfigError(
                    f"model.image_code_embed={self.image_code_embed} needs model.image_ids ([start, end) of the image "
                    "codes) and model.image_code_features (features per code): the training code fills both from the "
                    "tokenizers")
        if self.image_pos_embed and require_vocab and (self.image_grid is None or self.image_ids is None):
            raise ModelConfigError(
                "model.image_pos_embed=true needs model.image_grid (code-grid side) and model.image_ids "
                "([start, end) of the image codes): the training code fills both from the tokenizers; "
                "by hand: model.image_grid=8 'model.image_ids=[start,end]'"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a mapping (a Hydra `cfg.model` node or a parsed YAML), rejecting unknown keys.

        `overrides` win over `values` (e.g. `vocab_size=vocab.size`).
        """
        merged = {**dict(values), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ModelConfigError(
                f"unknown model config key(s) {', '.join('model.' + k for k in unknown)}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in merged)
        if missing:
            raise ModelConfigError(f"model config is missing {', '.join('model.' + k for k in missing)}")
        return cls(**merged)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Load `conf/model/<name>.yaml` (repo root = two levels above this package) into a config."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ModelConfigError(f"no model preset {name!r} at {path}; available presets: {available}")
        values = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(values, **overrides)


def _check_int(cfg: ModelConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"model.{name}={value!r} must be an integer >= {minimum}")


def _check_float(
    cfg: ModelConfig, name: str, low: float, low_inclusive: bool, high: float | None = None
) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelConfigError(
            f"model.{name}={value!r} must be a number (in YAML write 10000.0 or 1.0e4, not 1e4, which YAML reads as a string)"
        )
    below = value < low if low_inclusive else value <= low
    if below or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f"> {low}"
        raise ModelConfigError(f"model.{name}={value!r} must be {bound}")
