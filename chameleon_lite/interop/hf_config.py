"""HF Chameleon <-> chameleon-lite: vocabulary and config mapping (`hf.py` maps weights and does the IO).

What maps to what (export; import is the inverse)::

    ModelConfig / UnifiedVocab                  ChameleonConfig
    dim, n_layers                               hidden_size, num_hidden_layers
    n_heads, kv_heads                           num_attention_heads, num_key_value_heads
    ffn_hidden_dim, max_seq_len, init_std       intermediate_size, max_position_embeddings, initializer_range
    rope_theta, norm_eps, swin_norm             rope_parameters.rope_theta, rms_norm_eps, swin_norm
    attn_dropout, tie_embeddings                attention_dropout, tie_word_embeddings
    vocab.size, pad/bos/eos ids                 vocab_size, pad/bos/eos_token_id, vocabulary_map (names)

Image tokens: HF recognises one by its `vocabulary_map` name, "IMGIMG" + the code's decimal digits as letters
A-J + one trailing letter (code 407 -> "IMGIMGEAHZ"). The exported map names id `image_offset + c` as code c,
so HF's `bpe2img` equals `UnifiedVocab.ids_to_image` and HF's `forward` masks exactly our image block.

config.json carries a "chameleon_lite" block (the source ModelConfig and vocab, the image-encoder status).
Import reads HF's fields and takes from the block only what HF cannot state (`pad_to_multiple`, a shared
QK-norm, `resid_dropout`, ...), after checking that it agrees with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from chameleon_lite.model import ModelConfig, ModelConfigError
from chameleon_lite.vocab import BASE_SPECIALS, UnifiedVocab, VocabError, VocabLayout

try:
    import transformers
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
except ImportError as err:
    raise ImportError("chameleon_lite.interop needs Hugging Face transformers >= 5: "
                      "pip install 'chameleon-lite[hf]'") from err
__all__ = ["ChameleonConfig", "ChameleonForConditionalGeneration"]  # for hf.py: imported here, under the guard
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"chameleon_lite.interop needs transformers >= 5 (its `rope_parameters` config); "
                      f"found {transformers.__version__}")

HF_QK_NORM_EPS = 1e-5  # HF's ChameleonLayerNorm hard-codes this eps for QK-norm
IMAGE_NAME_PREFIX = "IMGIMG"
METADATA_KEY = "chameleon_lite"
METADATA_VERSION = 1
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
    size, layout = hf_config.vocab_size, metadata_block(hf_config).get("vocab", {}).get("layout")
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
    meta = metadata_block(hf_config).get("model", {})
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


def metadata_block(hf_config: ChameleonConfig) -> dict[str, Any]:
    """The config's "chameleon_lite" block ({} for HF configs written elsewhere); refuses other format versions."""
    meta = getattr(hf_config, METADATA_KEY, None) or {}
    if meta and meta.get("format_version") != METADATA_VERSION:
        raise HFInteropError(f"config.json's {METADATA_KEY}.format_version={meta.get('format_version')!r} "
                             f"is not {METADATA_VERSION}: written by another chameleon-lite version")
    return meta
