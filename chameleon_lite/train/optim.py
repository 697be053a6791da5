"""The optimizer of a training run, chosen by ``optim.name`` (``conf/optim``).

- ``adamw``: Chameleon's AdamW (paper, section 2.3) over two groups: the weights of linear layers decay;
  norms (per-head QK-norm gains are 2-D too), biases and embeddings (a tied head included) do not.
- ``muon``: ``torch.optim.Muon`` (momentum orthogonalised by Newton-Schulz iterations) for the hidden weight
  matrices of the decoder blocks, AdamW for the rest: the embeddings, the output head and the norms, the
  split Muon's authors prescribe. ``optim.muon.adjust_lr=match_rms_adamw`` (default) scales each matrix's
  update to AdamW's RMS (Moonshot, "Muon is Scalable for LLM Training"), so both share ``optim.lr``,
  ``optim.weight_decay`` and the schedule.

Lightning's automatic optimization steps one optimizer, so the two are stepped as one
(:class:`MuonWithAdamW`): a ``torch.optim.Optimizer`` whose parameter groups and state are those of the two
library optimizers, so that the LR scheduler, gradient clipping, ``zero_grad`` and checkpoints see every group.

Groups are chosen by module, not by tensor rank: under FSDP the optimizer is built after wrapping, when every
parameter is a flat 1-D view of its shard (which Muon cannot orthogonalise: `build_optimizer` says so).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from chameleon_lite.train.trainer import cpu_has_native_bf16

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "muon")


def optimizer_name(o: dict) -> str:
    """``optim.name``, checked (a config from before the key existed trained with AdamW)."""
    name = o.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is invalid: use {', '.join(OPTIMIZERS)} (e.g. optim=muon)")
    return name


def parameter_groups(model: nn.Module, o: dict) -> list[dict[str, Any]]:
    """The parameter groups of ``optim.name``'s optimizer, each with the settings `group_settings` gives it.

    ``model`` is a `ChameleonLM` (``embed_tokens``, ``lm_head``); every trainable parameter is in exactly one
    group. AdamW: [linear weights, the rest]; Muon: [hidden linear weights (Muon), output head (AdamW), the
    rest (AdamW)]."""
    embedding = model.embed_tokens.weight
    head = model.lm_head.weight if isinstance(model.lm_head, nn.Linear) else None
    head = None if head is embedding else head  # (a tied head is the embedding: no decay, AdamW)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not embedding}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name(o) == "adamw":
        members = [[p for p in trainable if id(p) in linear], [p for p in trainable if id(p) not in linear]]
    else:
        hidden = linear - {id(head)}
        members = [[p for p in trainable if id(p) in hidden], [p for p in trainable if p is head],
                   [p for p in trainable if id(p) not in linear]]
        flat = [tuple(p.shape) for p in members[0] if p.ndim != 2]
        if flat or not members[0]:  # (none: the wrapper's flat parameters are not the layers' weights)
            found = f"{len(flat)} hidden weights are not 2-D (shapes {flat[:3]})" if flat else "no hidden weight " \
                "is a trainable parameter of the model (all frozen, or held in a wrapper's flat parameters)"
            raise ValueError(f"optim.name=muon orthogonalises weight matrices, but {found}: FSDP flattens parameters "
                             "into 1-D shards. Train with trainer=ddp (or another strategy that keeps each weight "
                             "whole), or use optim=adamw")
    return [{"params": params, **settings} for params, settings in zip(members, group_settings(o), strict=True)]


def group_settings(o: dict) -> list[dict[str, Any]]:
    """The hyper-parameters of each parameter group, in group order, from the ``optim`` config: applied when the
    optimizer is built and again when a resume loaded a checkpoint's (`ChameleonLightningModule.on_train_start`)."""
    adamw = {"lr": o["lr"], "betas": tuple(o["betas"]), "eps": o["eps"]}
    decay = {**adamw, "weight_decay": o["weight_decay"]}
    no_decay = {**adamw, "weight_decay": 0.0}
    if optimizer_name(o) == "adamw":
        return [decay, no_decay]
    m = o["muon"]
    muon = {"lr": o["lr"] * m["lr_scale"], "weight_decay": o["weight_decay"], "momentum": m["momentum"],
            "nesterov": m["nesterov"], "ns_steps": m["ns_steps"], "adjust_lr_fn": m["adjust_lr"]}
    return [muon, decay, no_decay]


def build_optimizer(model: nn.Module, o: dict) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over `parameter_groups`."""
    groups = parameter_groups(model, o)
    if optimizer_name(o) == "adamw":
        return torch.optim.AdamW(groups, lr=o["lr"])
    on_cpu = any(p.device.type == "cpu" for p in groups[0]["params"])
    if on_cpu and cpu_has_native_bf16() is False:
        log.warning("optim.name=muon on a CPU without native bf16 (no AVX512-BF16, no AMX): torch.optim.Muon runs "
                    "its Newton-Schulz iterations in bf16, which this CPU emulates, so each step takes several "
                    "times longer; optim=adamw (experiment=shapes_cpu) trains at full speed here")
    return MuonWithAdamW(torch.optim.Muon(groups[:1], lr=groups[0]["lr"]), torch.optim.AdamW(groups[1:], lr=o["lr"]))


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` stepped as one optimizer.

    Its ``param_groups`` are the two optimizers' group dicts themselves (Muon's first) and its ``state`` is one
    mapping both of them write to (their parameters are disjoint), so the base class's ``zero_grad``,
    ``state_dict`` and ``load_state_dict`` and every LR scheduler work unchanged; a load re-links the two
    optimizers to the new groups and state."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()
