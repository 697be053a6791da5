"""Loading and exporting trained models. Never unpickles code: ``torch.load(weights_only=True)``.

Two formats:
- a Lightning ``.ckpt`` (resume format; carries optimizer and loop state),
- an exported directory ``model.safetensors`` + ``config.json`` (model config, vocab layout and
  the tokenizer directory it was trained with) — the format to hand to others.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chameleon_lite.files import atomic_path, atomic_write_text
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.model.code_appearance import bake_state
from chameleon_lite.vocab import UnifiedVocab

#: The head weight of a model with ``tie_embeddings``: the embedding matrix itself, not exported separately.
TIED_HEAD = "lm_head.weight"

#: `ModelConfig` fields (resolved) that shape the weights or what they compute, with the key that sets each: a
#: run started from another model's weights (``init_from``) must agree on these. The rest — dropouts, attn_impl,
#: grad_checkpointing, max_seq_len (RoPE is computed, not stored), init_std — are the new run's to choose.
ARCHITECTURE_KEYS = {"vocab_size": "vocab_size", "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
                     "kv_heads": "n_kv_heads", "ffn_hidden_dim": "ffn_dim", "rope_theta": "rope_theta",
                     "norm_eps": "norm_eps", "qk_norm": "qk_norm", "qk_norm_per_head": "qk_norm_per_head",
                     "swin_norm": "swin_norm", "tie_embeddings": "tie_embeddings",
                     "image_pos_embed": "image_pos_embed", "image_grid": "image_grid", "image_ids": "image_ids",
                     "image_code_embed": "image_code_embed"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) loaded."""


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` restricted to tensors and plain containers: a pickle carrying code is refused, and a
    file that is no checkpoint at all (a Git LFS pointer, JSON, an image) is named as such. ``mmap``: map the
    tensors instead of reading them (for a look at the hyper-parameters of a large checkpoint)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path}: a Git LFS pointer, not the checkpoint itself: fetch it (git lfs pull)")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or its legacy pickle format
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file "
                              f"starts with {head[:16]!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load — the file contains pickled objects that are not plain "
                              f"weights ({str(err).splitlines()[0]}). Only load checkpoints you trust, and "
                              "prefer exported safetensors directories.") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None


def export_weights(module, out_dir: Path, tokenizer_dir: str | os.PathLike,
                   module_state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for ``module.model`` into ``out_dir``. ``module_state``:
    the Lightning module's full state dict where ``module.model.state_dict()`` cannot give it alone (under
    FSDP, ``trainer.strategy.lightning_module_state_dict()``, gathered from the shards by every rank).
    A ``model.image_code_embed=appearance`` model is written as the plain model it computes (`bake_state`)."""
    out_dir = Path(out_dir)
    if module_state is None:
        weights = module.model.state_dict()
    else:
        weights = {k.removeprefix("model."): v for k, v in module_state.items() if k.startswith("model.")}
    weights, model_config = bake_state(dict(weights), module.model_config)
    state = {k: v.detach().contiguous() for k, v in weights.items()}
    if model_config.tie_embeddings:  # one tensor under two names: safetensors stores it once
        state.pop(TIED_HEAD, None)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {"model": asdict(model_config), "vocab": module.vocab.to_dict(),
            "tokenizer_dir": str(Path(tokenizer_dir).resolve())}
    training_data = (getattr(module, "hparams", None) or {}).get("training_data")
    if training_data:
        meta["training_data"] = dict(training_data)
    for key in ("init_from", "tokenizers"):
        if value := (getattr(module, "hparams", None) or {}).get(key):
            meta[key] = value
    atomic_write_text(out_dir / "config.json", json.dumps(meta, indent=2) + "\n")
    return out_dir


def _read_json(path: Path) -> dict:
    """A model directory's ``config.json`` as a dict; anything else is a `CheckpointError` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object), got {type(value).__name__}")
    return value


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ChameleonLM, UnifiedVocab, dict]:
    """Load a ``.ckpt`` file, an exported directory or a Hugging Face Chameleon directory (``chameleon-export-hf``'s,
    or one written by ``transformers``; needs the ``hf`` extra) -> (model in eval mode, vocab, metadata). The model
    is always a plain one: a ``model.image_code_embed=appearance`` checkpoint is baked (`bake_state`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (give ckpt=runs/<run>/checkpoints/last.ckpt "
                                "or an exported runs/<run>/model directory)")
    if path.is_dir():
        cfg_path, weights = path / "config.json", path / "model.safetensors"
        if cfg_path.is_file() and _read_json(cfg_path).get("model_type"):  # transformers' config
            try:
                from chameleon_lite.interop.hf import import_hf
            except ImportError as err:
                raise CheckpointError(f"{path} is a Hugging Face directory, which needs transformers ({err}): "
                                      "pip install -e '.[hf]'") from None
            model, vocab, meta = import_hf(path)
            return model.to(device).eval(), vocab, meta
        if not cfg_path.is_file() or not weights.is_file():
            raise CheckpointError(f"{path} is not an exported model directory (needs config.json and model.safetensors)")
        meta = _read_json(cfg_path)
        state = load_file(str(weights))
    else:
        ckpt = safe_torch_load(path)
        try:
            hp = ckpt["hyper_parameters"]
            meta = {"model": dict(hp["model"]), "vocab": dict(ckpt.get("vocab") or hp["vocab"]),
                    "tokenizer_dir": ckpt.get("tokenizer_dir"), "global_step": ckpt.get("global_step"),
                    "training_data": hp.get("training_data"), "tokenizers": hp.get("tokenizers")}
            state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a chameleon-lite training checkpoint (missing {err})") from None
    try:
        model_cfg = ModelConfig.from_dict(meta["model"])
        vocab = UnifiedVocab.from_dict(meta["vocab"], source=str(path))
        state, model_cfg = bake_state(state, model_cfg)  # (a .ckpt of model.image_code_embed=appearance)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: incomplete metadata ({err})") from None
    model = ChameleonLM(model_cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape than the config gives (e.g. an edited config.json)
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{path}: weights do not match the model config: {len(mismatches)} tensor(s) of "
                              f"another shape, e.g. {(mismatches or [str(err)])[0]}; use the config the weights were "
                              "saved with (config.json of the same export)") from None
    if model_cfg.tie_embeddings:  # the head is the embedding (exports store it once)
        missing = [k for k in missing if k != TIED_HEAD]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), vocab, meta


def init_weights_from(model: ChameleonLM, source: str | os.PathLike, vocab: UnifiedVocab) -> dict:
    """Copy into `model` the weights of `source` — an exported directory, a ``.ckpt`` or a Hugging Face
    Chameleon directory (``chameleon-export-hf``'s, or one written by ``transformers``) — to fine-tune it: the
    ``init_from`` of ``chameleon-train``. The source must have `vocab`'s layout and `model`'s architecture
    (`ARCHITECTURE_KEYS`); the error names every key that differs with the override that matches the source.
    Returns the source's metadata (as `load_model`)."""
    source = Path(source)
    loaded, found_vocab, meta = load_model(source)
    vocab.check_compatible(found_vocab, "this run's tokenizers", f"init_from={source}")
    unused = () if model.cfg.image_pos_embed or loaded.cfg.image_pos_embed else ("image_grid", "image_ids")
    differences = {key: (getattr(model.cfg, field), getattr(loaded.cfg, field))
                   for field, key in ARCHITECTURE_KEYS.items()
                   if field not in unused and getattr(model.cfg, field) != getattr(loaded.cfg, field)}
    if differences:
        listing = "; ".join(f"model.{key}={mine!r} here, {theirs!r} there" for key, (mine, theirs) in differences.items())
        fix = " ".join(f"model.{key}={json.dumps(theirs).replace(' ', '')}" for key, (_, theirs) in differences.items())
        raise CheckpointError(f"init_from={source} has another architecture than this run's model config: {listing}. "
                              f"Train it with the source's: {fix}")
    model.load_state_dict(loaded.state_dict())
    return meta
