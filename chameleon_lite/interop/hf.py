"""Export to and import from Hugging Face transformers' Chameleon (`ChameleonForConditionalGeneration`).

What maps to what (export; import is the inverse)::

    ModelConfig / UnifiedVocab                  ChameleonConfig
    dim, n_layers                               hidden_size, num_hidden_layers
    n_heads, kv_heads                           num_attention_heads, num_key_value_heads
    ffn_hidden_dim, max_seq_len, init_std       intermediate_size, max_position_embeddings, initializer_range
    rope_theta, norm_eps, swin_norm             rope_parameters.rope_theta, rms_norm_eps, swin_norm
    attn_dropout, tie_embeddings                attention_dropout, tie_word_embeddings
    vocab.size, pad/bos/eos ids                 vocab_size, pad/bos/eos_token_id, vocabulary_map (names)

    ChameleonLM state dict                      HF state dict (prefix model. except lm_head)
    layers.i.attention.qkv_proj  rows q|k|v     layers.i.self_attn.{q,k,v}_proj
    layers.i.attention.{q,k}_norm (D,)|(H, D)   layers.i.self_attn.{q,k}_norm (H, D), shared ones repeated
    layers.i.feed_forward.gate_up_proj  g|u     layers.i.mlp.{gate,up}_proj
    attn_norm, ffn_norm, o_proj, down_proj      input_layernorm, post_attention_layernorm, o_proj, down_proj

RoPE needs no permutation: Meta's checkpoints rotate interleaved channel pairs (2i, 2i+1), HF's conversion
permuted q/k (and QK-norm) rows into `rotate_half`'s layout (i, i + D/2), and chameleon-lite's `apply_rope`
uses that half layout, so rows copy unchanged both ways (the parity tests pin this).

Image tokens: HF recognises one by its `vocabulary_map` name, "IMGIMG" + the code's decimal digits as letters
A-J + one trailing letter (code 407 -> "IMGIMGEAHZ"). The exported map names id `image_offset + c` as code c,
so HF's `bpe2img` equals `UnifiedVocab.ids_to_image` and HF's `forward` masks exactly our image block.

config.json carries a "chameleon_lite" block (the source ModelConfig and vocab, the image-encoder status).
Import reads HF's fields and takes from the block only what HF cannot state (`pad_to_multiple`, a shared
QK-norm, `resid_dropout`, ...), after checking that it agrees with them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from chameleon_lite.files import atomic_path, atomic_write_text
from chameleon_lite.model import ChameleonLM, ModelConfig, ModelConfigError
from chameleon_lite.vocab import BASE_SPECIALS, UnifiedVocab, VocabError, VocabLayout
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.model import VQModel

try:
    import transformers
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
except ImportError as err:
    raise ImportError("chameleon_lite.interop.hf needs Hugging Face transformers >= 5: "
                      "pip install 'chameleon-lite[hf]'") from err
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"chameleon_lite.interop.hf needs transformers >= 5 (its `rope_parameters` config); "
                      f"found {transformers.__version__}")

log = logging.getLogger(__name__)

HF_QK_NORM_EPS = 1e-5  # HF's ChameleonLayerNorm hard-codes this eps for QK-norm
IMAGE_NAME_PREFIX = "IMGIMG"
METADATA_KEY = "chameleon_lite"
METADATA_VERSION = 1
VQ_PREFIX = "model.vqmodel."
# Stands in for an image encoder that is not exported: HF needs a vq_config; only the codebook size is real.
PLACEHOLDER_VQ = {"embed_dim": 8, "latent_channels": 32, "resolution": 16, "base_channels": 32,
                  "channel_multiplier": [1], "num_res_blocks": 1, "attn_type": "none"}
# ModelConfig field -> ChameleonConfig field, for every option whose value must agree on import.
MATCHED_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
                  "n_heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                  "ffn_hidden_dim": "intermediate_size", "rope_theta": "rope_parameters.rope_theta",
                  "norm_eps": "rms_norm_eps", "qk_norm": "q_norm/k_norm (always on)",
                  "swin_norm": "swin_norm",
                  "attn_dropout": "attention_dropout", "tie_embeddings": "tie_word_embeddings"}


class HFInteropError(ValueError):
    """A model, vocabulary or HF directory that cannot be converted exactly; the message names the option."""


# --------------------------------------------------------------------------------------------- vocabulary
def image_token_name(code: int) -> str:
    """HF/Meta name of image code `code`: "IMGIMG" + its digits as letters A-J + "Z" (407 -> IMGIMGEAHZ)."""
    return IMAGE_NAME_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def hf_vocabulary_map(vocab: UnifiedVocab) -> dict[str, int]:
    """`vocabulary_map` for `vocab`: every special token and every image code by name (text ids are unnamed:
    their pieces live in chameleon-lite's sentencepiece model, which is not exported)."""
    names = {name: i for i, name in enumerate(vocab.specials)}
    names.update({image_token_name(c): vocab.image_offset + c for c in range(vocab.n_image)})
    return names


def vocab_from_hf(hf_config: ChameleonConfig) -> UnifiedVocab:
    """The `UnifiedVocab` an HF config's ids describe, or `HFInteropError` naming what does not fit.

    Needed: image tokens (found by HF's own name parser) in one contiguous block with code c at id
    `offset + c`, no named token after that block, chameleon-lite's specials `<pad> <bos> <eos> <boi> <eoi>
    <sep>` named at ids 0-5 (then `<reserved_i>` at 6 + i), pad/bos/eos_token_id equal to those, and
    `vocab_size` = the padded layout size. Ids between the specials and the image block are text.
    `pad_to_multiple` comes from the "chameleon_lite" block; without one, the layout pads with our default
    64 when that gives `vocab_size`, else with one block up to `vocab_size`.

    Vocabularies that put image tokens before text, such as Meta's released one (image tokens at ids
    4-8195, BPE text after them, `<s>` at 0, boi/eoi inside the text range), are refused rather than
    permuted into our layout: a permuted model's text ids would belong to Meta's BPE tokenizer, which
    chameleon-lite's sentencepiece `TextTokenizer` cannot load, and its special ids would have to be
    re-pointed by hand; the result could not be driven by our tokenizers or `Sampler` and would be
    silently wrong if it were.
    """
    vmap = dict(hf_config.vocabulary_map or {})
    try:
        image = ChameleonImageVocabularyMapping(vmap).bpe2img  # HF's own parser: id -> code
    except ValueError:
        raise HFInteropError("vocabulary_map has an 'IMGIMG...' name that is no image code (digits as "
                             "letters A-J plus one trailing letter)") from None
    if not image:
        raise HFInteropError("vocabulary_map names no image token ('IMGIMG...'): chameleon-lite's vocabulary "
                             "needs an image block; export with chameleon-export-hf writes one")
    offset, n_image = min(image), len(image)
    if image != {offset + c: c for c in range(n_image)}:
        raise HFInteropError(f"vocabulary_map: the {n_image} image tokens must be one contiguous id block "
                             f"with code c at id {offset} + c (UnifiedVocab's image block); these are not")
    end = offset + n_image
    after = sorted((i, name) for name, i in vmap.items() if i >= end)
    if after:
        raise HFInteropError(
            f"vocabulary_map puts image tokens at ids {offset}-{end - 1} and other tokens after them "
            f"(e.g. {[n for _, n in after[:3]]}): chameleon-lite's UnifiedVocab needs the blocks specials | "
            "text | image. This layout (Meta's released Chameleon vocabulary has image tokens at 4-8195) is "
            "not supported; see vocab_from_hf's docstring for why ids are not permuted")
    for i, name in enumerate(BASE_SPECIALS):
        if vmap.get(name) != i:
            raise HFInteropError(f"vocabulary_map must name chameleon-lite's special tokens "
                                 f"{list(BASE_SPECIALS)} at ids 0-{len(BASE_SPECIALS) - 1}; "
                                 f"{name!r} is at {vmap.get(name)!r}, not {i}")
    n_reserved = 0
    while vmap.get(f"<reserved_{n_reserved}>") == len(BASE_SPECIALS) + n_reserved:
        n_reserved += 1
    n_text = offset - len(BASE_SPECIALS) - n_reserved
    if end > hf_config.vocab_size:
        raise HFInteropError(f"vocab_size={hf_config.vocab_size} but vocabulary_map names ids up to "
                             f"{end - 1}")
    size, layout = hf_config.vocab_size, _metadata(hf_config).get("vocab", {}).get("layout")
    if layout:  # exported by chameleon-lite: the block recorded it
        pad_to = layout["pad_to_multiple"]
    elif end == size:
        pad_to = 1
    else:  # our default 64 when it gives vocab_size, else one padding block up to vocab_size
        pad_to = 64 if -(-end // 64) * 64 == size else size
    try:
        vocab = UnifiedVocab(n_text, n_image, n_reserved, pad_to)
    except VocabError as err:
        raise HFInteropError(f"vocabulary_map gives no valid UnifiedVocab ({err})") from None
    if vocab.size != size:
        raise HFInteropError(f"vocab_size={size} disagrees with the vocabulary_map's layout "
                             f"({vocab.layout.describe()}, size {vocab.size})")
    if layout and VocabLayout(**layout) != vocab.layout:
        raise HFInteropError(f"config.json's {METADATA_KEY}.vocab ({VocabLayout(**layout).describe()}) "
                             f"disagrees with its vocabulary_map ({vocab.layout.describe()}): the HF config "
                             f"was edited; drop the {METADATA_KEY} block or fix the map")
    eos, pad = hf_config.eos_token_id, hf_config.pad_token_id
    special_ids = {"bos_token_id": (hf_config.bos_token_id, vocab.bos_id),
                   "eos_token_id": (eos[0] if isinstance(eos, list) and len(eos) == 1 else eos, vocab.eos_id),
                   "pad_token_id": (vocab.pad_id if pad is None else pad, vocab.pad_id)}
    for field, (value, ours) in special_ids.items():
        if value != ours:
            raise HFInteropError(f"{field}={value!r}: chameleon-lite's vocabulary fixes it at {ours}")
    return vocab


# --------------------------------------------------------------------------------------------- configs
def hf_config_from_model(cfg: ModelConfig, vocab: UnifiedVocab, *, drop_resid_dropout: bool = False,
                         vq_config: Mapping[str, Any] | None = None,
                         metadata: Mapping[str, Any] | None = None) -> ChameleonConfig:
    """The `ChameleonConfig` of a model, or `HFInteropError` listing every option HF cannot represent.

    Refused: `model.qk_norm=false` (HF always applies QK-norm), `model.norm_eps` != 1e-5 with QK-norm (HF
    hard-codes that eps there; ours shares `norm_eps`), `model.resid_dropout` > 0 (HF has none; it only acts
    in training, so `drop_resid_dropout=True` leaves it out), a `vocab` whose size is not `model.vocab_size`.
    `vq_config` defaults to a placeholder with the vocabulary's codebook size; `metadata` extends the
    "chameleon_lite" block.
    """
    problems = []
    if cfg.vocab_size != vocab.size:
        problems.append(f"model.vocab_size={cfg.vocab_size} but the vocabulary has size {vocab.size} "
                        f"({vocab.layout.describe()}): use the vocab the model was trained with")
    if not cfg.qk_norm:
        problems.append("model.qk_norm=false: HF's Chameleon always applies QK-norm (q_norm/k_norm are "
                        "not optional)")
    elif cfg.norm_eps != HF_QK_NORM_EPS:
        problems.append(f"model.norm_eps={cfg.norm_eps}: HF's Chameleon hard-codes eps={HF_QK_NORM_EPS} in "
                        "QK-norm, chameleon-lite uses norm_eps there too, so only norm_eps=1e-5 exports "
                        "exactly")
    if cfg.image_pos_embed:
        problems.append("model.image_pos_embed=true: HF's Chameleon has no image position embedding (its image "
                        "codes carry only the 1-D RoPE position); train with image_pos_embed=false to export")
    if cfg.resid_dropout and not drop_resid_dropout:
        problems.append(f"model.resid_dropout={cfg.resid_dropout}: HF's Chameleon has no residual dropout; "
                        "it acts only in training, so export with drop_resid_dropout=true to leave it out")
    if problems:
        raise HFInteropError("cannot export to HF Chameleon exactly:\n  " + "\n  ".join(problems))
    meta = {"format_version": METADATA_VERSION, "model": dataclasses.asdict(cfg), "vocab": vocab.to_dict(),
            **(metadata or {})}
    return ChameleonConfig(
        vocab_size=vocab.size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        pad_token_id=vocab.pad_id, bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False, attention_dropout=cfg.attn_dropout, mlp_bias=False, swin_norm=cfg.swin_norm,
        vq_config=dict(vq_config or {**PLACEHOLDER_VQ, "num_embeddings": vocab.n_image}),
        vocabulary_map=hf_vocabulary_map(vocab), architectures=["ChameleonForConditionalGeneration"],
        **{METADATA_KEY: meta},
    )


def model_config_from_hf(hf_config: ChameleonConfig) -> ModelConfig:
    """The `ModelConfig` an HF config describes, or `HFInteropError` naming the HF option we cannot run.

    QK-norm comes back per head (HF's layout, kept exactly) unless the "chameleon_lite" block says the source
    was shared; `import_hf`/`from_hf` then still switch to per head if the weights' heads differ.
    """
    problems = []
    rope = dict(hf_config.rope_parameters or {})
    if hf_config.hidden_act != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r}: chameleon-lite's feed-forward is SwiGLU "
                        "(silu)")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, field):
            problems.append(f"{field}=true: chameleon-lite's projections have no bias")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type={rope['rope_type']!r}: only plain RoPE ('default') "
                        "is supported")
    if hf_config.rms_norm_eps != HF_QK_NORM_EPS:
        problems.append(f"rms_norm_eps={hf_config.rms_norm_eps}: HF applies QK-norm with eps "
                        f"{HF_QK_NORM_EPS} and RMSNorm with rms_norm_eps; chameleon-lite's one norm_eps "
                        "covers both, so only 1e-5 is exact")
    if problems:
        raise HFInteropError("cannot import this HF Chameleon config exactly:\n  " + "\n  ".join(problems))
    meta = _metadata(hf_config).get("model", {})
    values: dict[str, Any] = dict(
        vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, n_kv_heads=hf_config.num_key_value_heads,
        ffn_dim=hf_config.intermediate_size, max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=hf_config.rms_norm_eps, qk_norm=True,
        qk_norm_per_head=meta.get("qk_norm_per_head", True), swin_norm=bool(hf_config.swin_norm),
        attn_dropout=float(hf_config.attention_dropout or 0.0),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
        **{k: meta[k] for k in ("resid_dropout", "attn_impl", "grad_checkpointing") if k in meta})
    # keep the source's "derived" spelling (None) of fields whose derived value HF stored explicitly
    if meta.get("n_kv_heads", 0) is None and values["n_kv_heads"] == values["n_heads"]:
        values["n_kv_heads"] = None
    try:
        derived_ffn = ModelConfig(**{**values, "ffn_dim": None}).ffn_hidden_dim
        if meta.get("ffn_dim", 0) is None and derived_ffn == values["ffn_dim"]:
            values["ffn_dim"] = None
        return ModelConfig(**values)
    except ModelConfigError as err:
        raise HFInteropError(f"the HF config is no valid chameleon-lite model: {err}") from None


def check_config_match(expected: ModelConfig, actual: ModelConfig, source: str) -> None:
    """Raise `HFInteropError` naming every option where `expected` (ours) and the HF model `actual` differ.

    Compared: everything that shapes the weights or the function, and `attn_dropout` (HF states it).
    Training-only knobs HF cannot state (resid_dropout, attn_impl, grad_checkpointing, max_seq_len,
    init_std) are `expected`'s to choose.
    """
    shown = {"kv_heads": "n_kv_heads (resolved)", "ffn_hidden_dim": "ffn_dim (resolved)"}
    diffs = [f"model.{shown.get(ours, ours)}={getattr(expected, ours)!r} but {source} has "
             f"{hf}={getattr(actual, ours)!r}"
             for ours, hf in MATCHED_FIELDS.items() if getattr(expected, ours) != getattr(actual, ours)]
    if diffs:
        raise HFInteropError("the HF model does not match the expected config:\n  " + "\n  ".join(diffs))


# --------------------------------------------------------------------------------------------- state dicts
def state_dict_to_hf(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """ChameleonLM state dict -> HF text-model state dict (no `model.vqmodel.*`).

    Fused qkv / gate-up weights are split along dim 0, a shared QK-norm is repeated per head; split and
    repeated tensors are copies (safetensors refuses tensors sharing storage). `lm_head.weight` is left out
    when tied: HF re-ties it to the embedding on load. Raises `HFInteropError` on a missing or unmapped key.
    """
    src = dict(state)
    H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    take = _taker(src, "the chameleon-lite state dict")
    out = {"model.embed_tokens.weight": take("embed_tokens.weight"), "model.norm.weight": take("norm.weight")}
    head = take("lm_head.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = (t.clone() for t in take(a + "attention.qkv_proj.weight").split([H * D, G * D, G * D]))
        gate, up = (t.clone() for t in take(a + "feed_forward.gate_up_proj.weight").chunk(2))
        out |= {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v,
                h + "self_attn.o_proj.weight": take(a + "attention.o_proj.weight"),
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": take(a + "feed_forward.down_proj.weight"),
                h + "input_layernorm.weight": take(a + "attn_norm.weight"),
                h + "post_attention_layernorm.weight": take(a + "ffn_norm.weight")}
        for norm, heads in (("q_norm", H), ("k_norm", G)):
            for kind in ("weight", "bias"):
                w = take(f"{a}attention.qk_norm.{norm[0]}_{kind}")
                out[f"{h}self_attn.{norm}.{kind}"] = w.expand(heads, D).clone() if w.dim() == 1 else w
    if src:
        raise HFInteropError(f"parameters with no HF Chameleon counterpart: {sorted(src)[:5]}")
    return {k: v.detach() for k, v in out.items()}


def state_dict_from_hf(hf_state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF state dict -> ChameleonLM state dict for `cfg` (the inverse of `state_dict_to_hf`; `model.vqmodel.*`
    is ignored). A shared QK-norm (`cfg.qk_norm_per_head=False`) needs bit-identical heads, else
    `HFInteropError` naming model.qk_norm_per_head; unmapped HF keys are an error too."""
    src = {k: v for k, v in hf_state.items() if not k.startswith(VQ_PREFIX)}
    take = _taker(src, "the HF state dict")
    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        src.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        qkv = [take(h + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out |= {a + "attention.qkv_proj.weight": torch.cat(qkv),
                a + "attention.o_proj.weight": take(h + "self_attn.o_proj.weight"),
                a + "feed_forward.gate_up_proj.weight": torch.cat([take(h + "mlp.gate_proj.weight"),
                                                                   take(h + "mlp.up_proj.weight")]),
                a + "feed_forward.down_proj.weight": take(h + "mlp.down_proj.weight"),
                a + "attn_norm.weight": take(h + "input_layernorm.weight"),
                a + "ffn_norm.weight": take(h + "post_attention_layernorm.weight")}
        for norm in ("q_norm", "k_norm"):
            for kind in ("weight", "bias"):
                w = take(f"{h}self_attn.{norm}.{kind}")
                if not cfg.qk_norm_per_head:
                    if not _heads_equal(w):
                        raise HFInteropError(f"model.qk_norm_per_head=false but {h}self_attn.{norm}.{kind} "
                                             "differs between heads: a shared QK-norm cannot hold it; use "
                                             "qk_norm_per_head=true")
                    w = w[0]
                out[f"{a}attention.qk_norm.{norm[0]}_{kind}"] = w
    if src:
        raise HFInteropError(f"HF weights with no chameleon-lite counterpart: {sorted(src)[:5]}")
    return out


# --------------------------------------------------------------------------------------------- image encoder
def vq_incompatibilities(vq_config: VQConfig) -> list[str]:
    """Why HF's `ChameleonVQVAE` cannot reproduce this VQ's encoder + quantizer (empty: it can, key for key).

    HF has no VQ decoder, so only the image *encoder* is ever exported; HF cannot turn codes into pixels.
    """
    reasons = []
    if vq_config.encoder != "conv":
        reasons.append(f"vq encoder={vq_config.encoder}: HF's ChameleonVQVAE has only taming's conv encoder")
    if vq_config.l2_normalize:
        reasons.append("vq l2_normalize=true: HF's quantizer picks the nearest raw code by Euclidean "
                       "distance, chameleon-lite's by cosine similarity of l2-normalised codes, so the codes "
                       "would differ")
    if vq_config.norm_groups != 32:
        reasons.append(f"vq norm_groups={vq_config.norm_groups}: HF's VQ encoder hard-codes GroupNorm "
                       "with 32 groups")
    return reasons


def _vq_export(vq: VQModel | None,
               vocab: UnifiedVocab) -> tuple[dict[str, Any] | None, dict[str, Tensor], str]:
    """(vq_config or None for the placeholder, `model.vqmodel.*` weights, status note) for the export."""
    if vq is None:
        return None, {}, ("not exported: no chameleon-lite VQ was given to the export. model.vqmodel "
                          "weights are absent (transformers initialises them randomly on load); vq_config is "
                          f"a placeholder with the vocabulary's codebook size {vocab.n_image}")
    c = vq.config
    if c.codebook_size != vocab.n_image:
        raise HFInteropError(f"the VQ has codebook_size={c.codebook_size} but the vocabulary has n_image="
                             f"{vocab.n_image}: give the VQ the model was trained with")
    reasons = vq_incompatibilities(c)
    if reasons:
        return None, {}, ("not exported: chameleon-lite's VQ is not HF-compatible (" + "; ".join(reasons)
                          + "). model.vqmodel weights are absent (transformers initialises them randomly on "
                          f"load); vq_config is a placeholder with the codebook size {vocab.n_image}")
    hf_vq = {"embed_dim": c.embed_dim, "num_embeddings": c.codebook_size,
             "latent_channels": c.latent_channels,
             "resolution": c.image_size, "in_channels": c.in_channels, "base_channels": c.base_channels,
             "channel_multiplier": list(c.channel_multipliers), "num_res_blocks": c.num_res_blocks,
             "attn_resolutions": None, "dropout": c.dropout,
             "attn_type": "vanilla" if c.mid_attention else "none"}
    state = {VQ_PREFIX + k: v for k, v in vq.export_state_dict().items() if not k.startswith("decoder.")}
    return hf_vq, state, ("exported: encoder, quant_conv, codebook and post_quant_conv as model.vqmodel; "
                          "pixels in [-1, 1]; HF has no VQ decoder, so images cannot be decoded from HF")


# --------------------------------------------------------------------------------------------- models
def to_hf(model: ChameleonLM, vocab: UnifiedVocab, *, vq: VQModel | None = None,
          drop_resid_dropout: bool = False) -> ChameleonForConditionalGeneration:
    """An in-memory HF model (fp32, eval mode) computing the same function as `model` (see `export_hf`)."""
    vq_config, vq_state, note = _vq_export(vq, vocab)
    hf_config = hf_config_from_model(model.cfg, vocab, drop_resid_dropout=drop_resid_dropout,
                                     vq_config=vq_config, metadata={"image_encoder": note})
    hf = ChameleonForConditionalGeneration(hf_config)
    state = state_dict_to_hf(model.state_dict(), model.cfg) | vq_state
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith(VQ_PREFIX) and not vq_state)
               and not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise HFInteropError(f"HF Chameleon's layout changed: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return hf.float().eval()


def from_hf(hf_model: ChameleonForConditionalGeneration, *, expected: ModelConfig | None = None,
            vocab: UnifiedVocab | None = None) -> tuple[ChameleonLM, UnifiedVocab]:
    """(ChameleonLM in eval mode, UnifiedVocab) from an in-memory HF model; `expected` and `vocab` as in
    `import_hf`."""
    return _build(hf_model.config, hf_model.state_dict(), expected, vocab, "the HF model")


def export_hf(model: ChameleonLM, vocab: UnifiedVocab, out_dir: str | os.PathLike, *,
              vq: VQModel | None = None, drop_resid_dropout: bool = False,
              dtype: torch.dtype = torch.float32, overwrite: bool = False,
              source: str | None = None, tokenizer_dir: str | None = None) -> Path:
    """Write `out_dir` so that `ChameleonForConditionalGeneration.from_pretrained(out_dir)` loads `model`.

    Files: config.json (HF config + "chameleon_lite" block), model.safetensors (weights in `dtype`),
    README.md (what was and was not exported). The image encoder goes along only when `vq` is given and
    HF-compatible (`vq_incompatibilities`); otherwise a warning is logged, the README and config say so, and
    HF gets a placeholder vq_config with the right codebook size and random VQ weights. Image tokens are
    still ordinary ids (`vocab.image_offset + code`) HF reads and, unmasked, predicts. No tokenizer is
    written: text ids are chameleon-lite's sentencepiece ids + `vocab.text_offset`; `source` and
    `tokenizer_dir` are recorded in the "chameleon_lite" block (`import_hf` returns `tokenizer_dir`).
    Raises `HFInteropError` for options HF cannot represent (see `hf_config_from_model`) or a non-empty
    `out_dir` without `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HFInteropError(f"out={out_dir} is not empty: choose a new directory or set overwrite=true")
    vq_config, vq_state, note = _vq_export(vq, vocab)
    hf_config = hf_config_from_model(
        model.cfg, vocab, drop_resid_dropout=drop_resid_dropout, vq_config=vq_config,
        metadata={"image_encoder": note, "source": source, "tokenizer_dir": tokenizer_dir})
    hf_config.dtype = dtype
    if not vq_state:
        log.warning("image encoder %s", note)
    state = state_dict_to_hf(model.state_dict(), model.cfg) | vq_state
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", hf_config.to_json_string(use_diff=False))
    atomic_write_text(out_dir / "README.md", _export_readme(model.cfg, vocab, note, source, dtype))
    log.info("wrote HF Chameleon directory %s", out_dir)
    return out_dir


def import_hf(path: str | os.PathLike, *, expected: ModelConfig | None = None,
              vocab: UnifiedVocab | None = None) -> tuple[ChameleonLM, UnifiedVocab, dict]:
    """Load an HF Chameleon directory (config.json + safetensors, sharded or not) -> (ChameleonLM in eval mode
    with fp32 weights, UnifiedVocab, metadata like `checkpoint.load_model`'s).

    `expected`: the config the caller needs (a training preset): every option the HF model states must agree
    (`check_config_match`) and the model is built with `expected` (its training-only knobs kept). `vocab`: the
    caller's vocabulary, which must have the same layout. Weights are read with safetensors only (no pickle).
    Raises `HFInteropError` for anything we cannot represent exactly, `FileNotFoundError` for a missing dir.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not an HF model directory (no config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "chameleon":
        raise HFInteropError(f"{config_path}: model_type={model_type!r}, expected 'chameleon'")
    hf_config = ChameleonConfig.from_pretrained(str(path))
    model, vocab = _build(hf_config, _read_weights(path), expected, vocab, str(path))
    meta = _metadata(hf_config)
    return model, vocab, {"model": dataclasses.asdict(model.cfg), "vocab": vocab.to_dict(),
                          "tokenizer_dir": meta.get("tokenizer_dir"), "source": str(path)}


# --------------------------------------------------------------------------------------------- helpers
def _build(hf_config: ChameleonConfig, hf_state: Mapping[str, Tensor], expected: ModelConfig | None,
           vocab: UnifiedVocab | None, source: str) -> tuple[ChameleonLM, UnifiedVocab]:
    """Vocab and config from `hf_config`, checked against the caller's; then the fp32 model in eval mode."""
    found_vocab = vocab_from_hf(hf_config)
    if vocab is not None:
        vocab.check_compatible(found_vocab, "the given vocab", source)
    cfg = model_config_from_hf(hf_config)
    if not cfg.qk_norm_per_head and not all(_heads_equal(w) for k, w in hf_state.items() if "_norm." in k
                                            and "self_attn" in k):
        cfg = dataclasses.replace(cfg, qk_norm_per_head=True)  # heads were trained apart: keep them exactly
    if expected is not None:
        check_config_match(expected, cfg, source)
        cfg = expected
    model = ChameleonLM(cfg)
    try:
        model.load_state_dict(state_dict_from_hf(hf_state, cfg))
    except RuntimeError as err:
        reason = str(err).splitlines()[-1].strip()
        raise HFInteropError(f"{source}: weights do not match its config: {reason}") from None
    return model.float().eval(), found_vocab


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The text-model tensors of `model.safetensors` or a sharded `model.safetensors.index.json`."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise HFInteropError(f"{path}: no model.safetensors (or sharded index); pickled weights "
                             "(pytorch_model.bin) are refused: convert them to safetensors first")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            # safe_open has keys() but no __iter__
            names = [key for key in reader.keys() if not key.startswith(VQ_PREFIX)]  # noqa: SIM118
            state |= {key: reader.get_tensor(key) for key in names}
    return state


def _metadata(hf_config: ChameleonConfig) -> dict[str, Any]:
    meta = getattr(hf_config, METADATA_KEY, None) or {}
    if meta and meta.get("format_version") != METADATA_VERSION:
        raise HFInteropError(f"config.json's {METADATA_KEY}.format_version={meta.get('format_version')!r} "
                             f"is not {METADATA_VERSION}: written by another chameleon-lite version")
    return meta


def _heads_equal(weight: Tensor) -> bool:
    return bool((weight == weight[:1]).all())


def _taker(src: dict[str, Tensor], what: str):
    def take(key: str) -> Tensor:
        try:
            return src.pop(key)
        except KeyError:
            raise HFInteropError(f"{what} has no {key!r}: it does not match the model config") from None

    return take


def _export_readme(cfg: ModelConfig, vocab: UnifiedVocab, note: str, source: str | None,
                   dtype: torch.dtype) -> str:
    """README.md of an export: how to load it, the vocabulary layout, the image-encoder status."""
    qk = "per head" if cfg.qk_norm_per_head else "shared (stored repeated per head)"
    last_image = vocab.image_offset + vocab.n_image - 1
    origin, weights = source or "an in-memory model", str(dtype).removeprefix("torch.")
    return f"""# chameleon-lite model in Hugging Face Chameleon format

Exported by `chameleon-export-hf` from `{origin}`, weights in {weights}.

```python
from transformers import ChameleonForConditionalGeneration
model = ChameleonForConditionalGeneration.from_pretrained("path/to/this/dir")
```

- Model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.kv_heads} key/value heads, \
swin_norm {str(cfg.swin_norm).lower()}, QK-norm {qk}.
- Vocabulary, {vocab.size} ids: specials 0-{vocab.n_special - 1} (`<pad>`=0 `<bos>`=1 `<eos>`=2 `<boi>`=3 \
`<eoi>`=4), text {vocab.text_offset}-{vocab.image_offset - 1} (sentencepiece id + {vocab.text_offset}; \
the text tokenizer is not exported), image codes {vocab.image_offset}-{last_image} (code + \
{vocab.image_offset}, named `IMGIMG...` in `vocabulary_map`), padding after.
- Image encoder: {note}.
- HF's `forward` sets image-token logits to the dtype minimum (HF's Chameleon cannot generate images); \
`model.lm_head(model.model(input_ids=ids).last_hidden_state)` gives the unmasked logits chameleon-lite \
computes.
- `chameleon_lite.interop.hf.import_hf` loads this directory back with bit-identical weights.
"""
