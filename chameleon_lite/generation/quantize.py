"""Int8 weight-only quantization for decoding (gpt-fast style), opt-in: ``Generator.load(..., quantize="int8")``.

Batch-1 decoding multiplies one activation vector by every weight matrix per token, so its speed is
the speed at which the weights stream from memory. Storing the projection and head weights as int8
with one bf16 scale per output row cuts that traffic 4x against fp32; the products run in PyTorch's
``_weight_int8pack_mm`` kernel (bf16 activations, int8 weights, bf16 result, cast back to the model's
dtype). Embeddings, norms, QK-norm and the KV cache stay as they were.

The model changes numerically: per-row symmetric rounding of the weights (relative error of a product
~1%) and bf16 activations into each product. It is for sampling, not training, and greedy decoding
can diverge from fp32 after a near-tie; ``tests/generation/test_quantize.py`` bounds the logit error.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

QUANTIZE_MODES = (None, "int8")
_KERNEL_DTYPE = torch.bfloat16


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with ``q`` int8 (out, in) and one ``scale`` per output row (bias-free)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("q_weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(_KERNEL_DTYPE))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x, slice(None))

    def rows(self, x: Tensor, rows: slice) -> Tensor:
        """The outputs of rows ``rows`` only (a contiguous view of the int8 weight, no copy)."""
        flat = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
        y = torch._weight_int8pack_mm(flat, self.q_weight[rows], self.scale[rows])
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a `ChameleonLM`, in eval mode) with every bias-free ``nn.Linear`` replaced by
    an `Int8Linear`: the attention and feed-forward projections and the head (a tied head is copied,
    the embedding stays float). The original model is left untouched."""
    if model.training:
        raise ValueError("quantize_int8 is for sampling: call model.eval() first (an int8 model cannot train)")
    if model.cfg.image_code_embed != "free":
        raise ValueError("quantize_int8 needs a plain model, not model.image_code_embed=appearance (whose head rows "
                         "are computed): load it with checkpoint.load_model, which bakes them into the weights")
    quantized = copy.deepcopy(model)
    linears = [(name, m) for name, m in quantized.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        if linear.bias is not None:
            raise ValueError(f"quantize_int8 handles bias-free linears; {name} has a bias")
        parent_name, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent_name), child, Int8Linear(linear.weight))
    return quantized


def apply_quantize(model: nn.Module, quantize: str | None) -> nn.Module:
    """``model`` as given (``quantize=None``) or `quantize_int8`'s copy; an unknown mode names the choices."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is invalid: use null (float weights) or 'int8' "
                         "(int8 weight-only decoding)")
    return model if quantize is None else quantize_int8(model)
