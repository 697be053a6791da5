"""Image codes embedded by what they look like: ``model.image_code_embed=appearance`` (or ``free+appearance``).

A VQ code id is an arbitrary index. With a free embedding row and a free head row per code, a model learns
"red" and "triangle edge" once per code, and a colour-shape pair that training never draws is made of codes it
never learnt to put in that place: it draws a red circle and a blue triangle for "a red triangle and a blue
circle". Here an image code's input embedding and its head row are linear maps of the code's appearance
(`ImageTokenizer.code_appearance`: contrast pattern, ink colour, ink fraction, measured on the training
images), so an image code's logit is a pattern score plus a colour score, learnt from all codes at once.
``free+appearance`` adds these rows to the free ones: what appearance does not describe stays learnable per code.

It is a training-time parametrisation of the two weight matrices: `bake_state` writes the rows it gives into
plain ``embed_tokens.weight`` / ``lm_head.weight``, so an exported or loaded model is a plain `ChameleonLM`
(generation, quantization and the Hugging Face export see no difference).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from chameleon_lite.model.config import ModelConfig

#: State-dict keys of the parametrisation (under ``image_codes.``), replaced by the rows they give in `bake_state`.
APPEARANCE_KEYS = ("image_codes.features", "image_codes.embed_proj", "image_codes.head_proj")


def with_code_rows(weight: Tensor, start: int, rows: Tensor) -> Tensor:
    """``weight`` (V, dim) with rows ``[start, start + len(rows))`` replaced by ``rows`` (cast to its dtype)."""
    return torch.cat([weight[:start], rows.to(weight.dtype), weight[start + rows.shape[0]:]])


def image_code_rows(weight: Tensor, cfg: ModelConfig, rows: Tensor) -> Tensor:
    """``weight`` (embedding or head, (V, dim)) with its image-code rows as ``cfg.image_code_embed`` makes them
    from the appearance ``rows``: the rows themselves ("appearance") or added to the free rows ("free+appearance")."""
    start, end = cfg.image_ids
    if cfg.image_code_embed == "free+appearance":
        rows = weight[start:end].float() + rows
    return with_code_rows(weight, start, rows)


def appearance_rows(features: Tensor, proj: Tensor) -> Tensor:
    """The image codes' rows, ``features @ proj`` (n_codes, dim), in float32 whatever autocast says: the rows
    are weights, as a plain model's are, and the baked model must compute the same."""
    with torch.autocast(device_type=proj.device.type, enabled=False):
        return features.float() @ proj.float()


class CodeAppearance(nn.Module):
    """``features`` (n_codes, n_features), a buffer set once from the image tokenizer (saved with the weights);
    ``embed_proj`` and ``head_proj`` (n_features, dim), learnt: the input embeddings and head rows of the codes."""

    def __init__(self, n_codes: int, n_features: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.zeros(n_codes, n_features))
        self.embed_proj = nn.Parameter(torch.empty(n_features, dim))
        self.head_proj = nn.Parameter(torch.empty(n_features, dim))

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        """Rows of about ``init_std`` for standardised features (as a free row's N(0, init_std))."""
        std = init_std / self.features.shape[1] ** 0.5
        nn.init.normal_(self.embed_proj, std=std)
        nn.init.normal_(self.head_proj, std=std)

    @torch.no_grad()
    def set_features(self, features: Tensor) -> None:
        """Copy in `ImageTokenizer.code_appearance`'s features; a shape other than the buffer's is named."""
        if tuple(features.shape) != tuple(self.features.shape):
            raise ValueError(f"code appearance features of shape {tuple(features.shape)}, but the model holds "
                             f"{tuple(self.features.shape)} (model.image_ids block x model.image_code_features)")
        self.features.copy_(features)


def bake_state(state: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], ModelConfig]:
    """A state dict and config of ``image_code_embed=appearance`` (or ``free+appearance``) -> those of the plain
    model that computes the same (its image rows written into ``embed_tokens.weight`` and ``lm_head.weight``).
    Other configs pass through unchanged. ``state`` is not modified."""
    if cfg.image_code_embed == "free":
        return state, cfg
    state = dict(state)
    features, embed_proj, head_proj = (state.pop(key) for key in APPEARANCE_KEYS)
    for key, proj in (("embed_tokens.weight", embed_proj), ("lm_head.weight", head_proj)):
        state[key] = image_code_rows(state[key], cfg, appearance_rows(features, proj))
    plain = dataclasses.replace(cfg, image_code_embed="free", image_code_features=None,
                                image_ids=cfg.image_ids if cfg.image_pos_embed else None)
    return state, plain
