"""Export to and import from Hugging Face transformers' Chameleon (`ChameleonForConditionalGeneration`).

Vocabulary and config mapping live in `hf_config`; this module maps the weights and reads/writes HF
directories. Weights (export; import is the inverse)::

    ChameleonLM state dict                      HF state dict (prefix model. except lm_head)
    layers.i.attention.qkv_proj  rows q|k|v     layers.i.self_attn.{q,k,v}_proj
    layers.i.attention.{q,k}_norm (D,)|(H, D)   layers.i.self_attn.{q,k}_norm (H, D), shared ones repeated
    layers.i.feed_forward.gate_up_proj  g|u     layers.i.mlp.{gate,up}_proj
    attn_norm, ffn_norm, o_proj, down_proj      input_layernorm, post_attention_layernorm, o_proj, down_proj

RoPE needs no permutation: Meta's checkpoints rotate interleaved channel pairs (2i, 2i+1), HF's conversion
permuted q/k (and QK-norm) rows into `rotate_half`'s layout (i, i + D/2), and chameleon-lite's `apply_rope`
uses that half layout, so rows copy unchanged both ways (the parity tests pin this).
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
from chameleon_lite.interop.hf_config import (  # imports transformers, with a clear error without it
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    HFInteropError,
    check_config_match,
    hf_config_from_model,
    metadata_block,
    model_config_from_hf,
    vocab_from_hf,
)
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import UnifiedVocab
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.model import VQModel

__all__ = ["HFInteropError", "export_hf", "from_hf", "import_hf", "to_hf"]

log = logging.getLogger(__name__)

VQ_PREFIX = "model.vqmodel."

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


#: What a model's metadata records of its training, kept through an HF export (``record``) and returned by
#: `import_hf`: the tokenizer files' digests, the training data, the weights it started from.
RECORD_KEYS = ("tokenizers", "training_data", "init_from")


def export_hf(model: ChameleonLM, vocab: UnifiedVocab, out_dir: str | os.PathLike, *,
              vq: VQModel | None = None, drop_resid_dropout: bool = False,
              dtype: torch.dtype = torch.float32, overwrite: bool = False,
              source: str | None = None, tokenizer_dir: str | None = None,
              record: Mapping[str, Any] | None = None) -> Path:
    """Write `out_dir` so that `ChameleonForConditionalGeneration.from_pretrained(out_dir)` loads `model`.

    Files: config.json (HF config + "chameleon_lite" block), model.safetensors (weights in `dtype`),
    README.md (what was and was not exported). The image encoder goes along only when `vq` is given and
    HF-compatible (`vq_incompatibilities`); otherwise a warning is logged, the README and config say so, and
    HF gets a placeholder vq_config with the right codebook size and random VQ weights. Image tokens are
    still ordinary ids (`vocab.image_offset + code`) HF reads and, unmasked, predicts. No tokenizer is
    written: text ids are chameleon-lite's sentencepiece ids + `vocab.text_offset`; `source` and
    `tokenizer_dir` are recorded in the "chameleon_lite" block (`import_hf` returns `tokenizer_dir`), with the
    `RECORD_KEYS` of ``record`` (the source model's metadata: tokenizer digests, training data, init_from).
    Raises `HFInteropError` for options HF cannot represent (see `hf_config_from_model`) or a non-empty
    `out_dir` without `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise HFInteropError(f"out={out_dir} is not empty: choose a new directory or set overwrite=true")
    vq_config, vq_state, note = _vq_export(vq, vocab)
    hf_config = hf_config_from_model(
        model.cfg, vocab, drop_resid_dropout=drop_resid_dropout, vq_config=vq_config,
        metadata={"image_encoder": note, "source": source, "tokenizer_dir": tokenizer_dir,
                  **{k: v for k, v in (record or {}).items() if k in RECORD_KEYS and v}})
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
    meta = metadata_block(hf_config)
    return model, vocab, {"model": dataclasses.asdict(model.cfg), "vocab": vocab.to_dict(),
                          "tokenizer_dir": meta.get("tokenizer_dir"), "source": str(path),
                          **{k: meta[k] for k in RECORD_KEYS if meta.get(k)}}


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
