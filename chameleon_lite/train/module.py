"""ChameleonLightningModule: next-token training of ChameleonLM on packed mixed-modal rows.

Logged every step: ``train/loss`` (ce + z-loss), ``train/ce``, ``train/z_loss``, cross-entropy per
modality of the *target* token (``train/ce_text``, ``train/ce_image``) and the stability signals
the Chameleon paper watches (``stability/*``: RMS of the final hidden state and max |logit| per
modality; see :class:`~chameleon_lite.train.callbacks.StabilityMonitor`). The vocab layout is stored
in every checkpoint and checked when tokenizers are paired with it again.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import lightning as L
import torch
from torch import Tensor

from chameleon_lite.data.sequences import IGNORE_INDEX
from chameleon_lite.model import ChameleonLM, ModelConfig, head_loss
from chameleon_lite.train.optim import build_optimizer, group_settings, optimizer_name
from chameleon_lite.vocab import UnifiedVocab

SCHEDULES = ("cosine", "exponential", "constant")
#: What a validation pass adds up on each process (`ChameleonLightningModule.on_validation_epoch_end`).
_VAL_SUMS = ("loss", "ce", "z_loss", "tokens", "ce_text", "text_tokens", "ce_image", "image_tokens")


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine / exponential decay to ``min_ratio`` at ``total`` (or constant)."""
    if schedule not in SCHEDULES:  # before any early return: a typo fails at construction, not at step `warmup`
        raise ValueError(f"optim.schedule={schedule!r} is invalid: use {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio ** progress  # exponential


def _sum_over_processes(counts: Counter) -> Counter:
    """The counts of every process added up (a collective: every process must call it)."""
    return sum((Counter(c) for c in _gather_from_processes(dict(counts))), Counter())


def _gather_from_processes(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (a collective: every process must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _seed_process(rank: int) -> None:
    """Move this process to a stream of its own, derived from the current one and its rank."""
    seed = int(torch.randint(2 ** 62, (1,)))  # the same draw on every process (same stream so far)
    torch.manual_seed(seed + rank)  # (also seeds CUDA)


def trainer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer settings that change what a step computes, beside the module's hyper-parameters, recorded in
    every checkpoint so that a resume can tell when they changed: gradient clipping, normalised (no clipping is
    None whether 0 or null; Lightning clips by norm when no algorithm is given), and micro-batches per step.
    Precision is not among them: ``cpu_bf16=auto`` picks it per machine."""
    value = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
    algorithm = trainer.gradient_clip_algorithm
    algorithm = str(getattr(algorithm, "value", algorithm)) if algorithm is not None else "norm"
    return {"gradient_clip_val": value, "gradient_clip_algorithm": algorithm if value else None,
            "accumulate_grad_batches": trainer.accumulate_grad_batches}


class ChameleonLightningModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict, vocab: dict, total_steps: int, tokenizer_dir: str | None = None,
                 compile: bool = False, training_data: dict | None = None, init_from: str | None = None,
                 tokenizers: dict | None = None):
        """All arguments are plain dicts so that ``save_hyperparameters`` makes checkpoints self-describing.

        model: ModelConfig fields (vocab_size filled); optim: conf/optim fields; vocab:
        ``UnifiedVocab.to_dict()``; total_steps: optimiser steps of the run (for the schedule);
        tokenizer_dir: where the tokenizers live (recorded so sampling finds them again);
        compile: compile each decoder block with ``torch.compile`` (`configure_model`);
        training_data: `training_data_record` of the data config (kept in the checkpoint and the exported
        model, so evaluation can tell when it scores against another shapes world);
        init_from: the model whose weights the run started from (recorded; ``chameleon-train init_from=``
        copies them in, `checkpoint.init_weights_from`);
        tokenizers: `tokenizer_digests` of tokenizer_dir (a resume, a fine-tune or sampling with other tokenizer
        files of the same vocab layout is then refused or named).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(model)
        self.vocab = UnifiedVocab.from_dict(vocab, source="checkpoint hyper-parameters")
        if self.model_config.vocab_size < self.vocab.size:
            raise ValueError(f"model.vocab_size={self.model_config.vocab_size} < vocab size {self.vocab.size}")
        lr_lambda(0, optim["warmup_steps"], total_steps, optim["schedule"], optim["min_lr_ratio"])
        optimizer_name(optim)  # (a bad optim.name fails here, not when the fit builds the optimizer)
        self.model = ChameleonLM(self.model_config)
        self.z_loss_coef = float(optim["z_loss"])
        self.tokenizer_dir = tokenizer_dir
        self._loss_ref: float | None = None  # labels per micro-batch of the first step (`on_before_optimizer_step`)
        self._step_tokens: Tensor | None = None  # loss tokens of this rank's micro-batches since the last step
        self.register_buffer("_image_ids", self.vocab.image_mask(), persistent=False)

    def configure_model(self) -> None:
        """``compile=True``: `ChameleonLM.compile_blocks` (the norms, QK-norm, RoPE, SwiGLU and residual
        adds of a block fuse into a few C++/Triton kernels; checkpoints are unchanged). Compiling takes
        ~1 min on 2 CPU cores, once per process (and once more for a smaller last batch)."""
        if self.hparams.compile:
            self.model.compile_blocks()

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        return self.model(input_ids, **kwargs)

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        self.vocab.check_ids(batch["input_ids"], what=f"{stage} batch input_ids")
        hidden = self.model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                          doc_lens=batch["doc_lens"])
        labels = batch["labels"]
        out = head_loss(hidden, self.model.head_weight(), labels, self.z_loss_coef, IGNORE_INDEX)
        counted = labels != IGNORE_INDEX
        is_image = self._image_ids[labels.clamp(min=0)] & counted  # (B, T) target is an image code
        is_text = counted & ~is_image
        metrics = {"loss": out.loss, "ce": out.ce, "z_loss": out.z_loss}
        if stage != "train":
            self._add_val_sums(out, is_text, is_image)
            return metrics
        for name, mask in (("text", is_text), ("image", is_image)):
            n = mask.sum()
            if n > 0:
                metrics[f"ce_{name}"] = out.token_ce[mask].sum() / n
        for k, v in metrics.items():
            self.log(f"train/{k}", v.detach(), prog_bar=k == "loss", on_step=True, on_epoch=False,
                     batch_size=labels.shape[0])
        with torch.no_grad():
            stats = {"stability/hidden_rms": hidden.detach().float().pow(2).mean().sqrt()}
            for name, mask in (("text", is_text), ("image", is_image)):
                if mask.any():
                    stats[f"stability/max_logit_{name}"] = out.max_abs_logit[mask].max()
        metrics["stability"] = stats
        metrics["n_tokens"] = out.n_tokens
        return metrics

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        out = self._shared_step(batch, "train")
        accumulate = self.trainer.accumulate_grad_batches
        if self.trainer.world_size > 1 or accumulate > 1:
            n_tokens = out["n_tokens"].detach()
            if self._loss_ref is None:
                self._loss_ref = float(batch["labels"].numel())
            self._step_tokens = n_tokens if self._step_tokens is None else self._step_tokens + n_tokens
            out["loss"] = out["loss"] * (n_tokens * accumulate / self._loss_ref)
        return out

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Turn the summed gradients into those of the mean over every loss token of the optimizer step.

        A micro-batch's loss is the mean over its own loss tokens; Lightning averages micro-batches of
        an accumulation window with equal weights and DDP averages ranks with equal weights, however many
        loss tokens each holds (packed rows and ``loss_on`` give them different counts), so the update would
        differ from one process taking the same rows in one batch. `training_step` therefore backpropagates
        each micro-batch's loss *sum* (over a fixed reference count, to keep magnitudes near 1), and here,
        once the window is complete and DDP has averaged, the gradients are divided by the step's global
        token count: one all-reduce per optimizer step. Runs on the module hook, after callbacks (the
        non-finite guard) and before gradient clipping, so clipping sees the true gradient. One process
        without accumulation is left exactly as it was. The logged ``train/*`` values stay micro-batch means.
        """
        if self._step_tokens is None:
            return
        n_tokens, self._step_tokens = self._step_tokens.float(), None
        if self.trainer.world_size > 1:
            n_tokens = self.trainer.strategy.reduce(n_tokens, reduce_op="sum")
        if not bool(n_tokens > 0):
            return  # no loss tokens anywhere: every gradient is already zero
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # one Python float: no rounding of the factor to low-precision grads, any grad device
            torch._foreach_mul_(grads, float(self._loss_ref * self.trainer.world_size / n_tokens))

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except under FSDP: there the norm must be taken over every rank's shard, which
        only the root FSDP module can do (Lightning's FSDP precision plugin refuses ``gradient_clip_algorithm=
        norm`` outright, so ``trainer=fsdp`` with the default ``gradient_clip_val`` would stop at step 1)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r} under FSDP: only "
                                 "'norm' is supported (the root FSDP module's clip_grad_norm_)")
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_validation_epoch_start(self) -> None:
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # (MPS has no float64)
        self._val_sums = torch.zeros(len(_VAL_SUMS), dtype=dtype, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if bool((batch["labels"] != IGNORE_INDEX).any()):
            self._shared_step(batch, "val")
        else:  # only rows that even out the processes' shares: still a forward, since under FSDP every process
            # must all-gather each block's parameters in step with the others
            self.model.hidden_states(batch["input_ids"], positions=batch["positions"], doc_lens=batch["doc_lens"])

    def _add_val_sums(self, out: Any, is_text: Tensor, is_image: Tensor) -> None:
        n = out.n_tokens
        parts = {"loss": out.loss * n, "ce": out.ce * n, "z_loss": out.z_loss * n, "tokens": n,
                 "ce_text": out.token_ce[is_text].sum(), "text_tokens": is_text.sum(),
                 "ce_image": out.token_ce[is_image].sum(), "image_tokens": is_image.sum()}
        self._val_sums += torch.stack([parts[k].detach().to(self._val_sums.dtype) for k in _VAL_SUMS])

    def on_validation_epoch_end(self) -> None:
        """Log ``val/*`` as means over every loss token of the validation pass, on all processes together: a
        mean of batch means would weigh a token by its batch's size (and the process count), and a per-batch
        ``sync_dist`` log of a modality one process lacks would pair other collectives across processes."""
        sums = self._val_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        total = dict(zip(_VAL_SUMS, sums.tolist(), strict=True))
        for key, count in (("loss", "tokens"), ("ce", "tokens"), ("z_loss", "tokens"), ("ce_text", "text_tokens"),
                           ("ce_image", "image_tokens")):
            if total[count] > 0:
                self.log(f"val/{key}", total[key] / total[count], prog_bar=key == "loss")

    def on_train_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        skipped = getattr(dm, "skipped", None)
        if skipped is None:
            return
        val_skipped = getattr(dm, "val_skipped", Counter())
        if getattr(dm, "skipped_per_process", False):  # each process counted its own shards: add them up
            skipped = _sum_over_processes(skipped)
        if getattr(dm, "val_split_over_processes", False):  # (else every process read the same val rows)
            val_skipped = _sum_over_processes(val_skipped)
        total = sum(skipped.values())
        self.log("data/skipped_records", float(total), rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        for what, counts in (("records", skipped), ("validation records (per pass)", val_skipped)):
            if n := sum(counts.values()):
                reasons = "; ".join(f"{k} x {why}" for why, k in counts.most_common())
                print(f"[data] epoch {self.current_epoch}: skipped {n} {what}: {reasons}")

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        o = self.hparams.optim
        opt = build_optimizer(self.model, o)
        total = self.hparams.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o["warmup_steps"], total, o["schedule"], o["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """Apply this run's `optim` settings to the optimizer and schedule. After a resume Lightning has loaded
        the checkpoint's optimizer and scheduler states over the ones `configure_optimizers` built, with their
        learning rate, betas, eps and weight decay, and the first step would run at the rate the old schedule
        left: a ``resume_check=warn`` resume with a new ``optim.lr``, or any resume with a new
        ``trainer.max_steps``, trained with the old settings. A no-op for a fresh run and an exact resume."""
        settings = group_settings(self.hparams.optim)
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            groups = sched.optimizer.param_groups
            for group, setting in zip(groups, settings, strict=True):
                group.update(setting, initial_lr=setting["lr"])
            sched.base_lrs = [setting["lr"] for setting in settings]
            for group, base, schedule in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * schedule(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in groups]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vocab"] = self.vocab.to_dict()
        checkpoint["trainer_settings"] = trainer_settings(self.trainer)  # (checked on resume: `cli.train`)
        if self.tokenizer_dir is not None:
            checkpoint["tokenizer_dir"] = str(self.tokenizer_dir)
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "per_process": _gather_from_processes(_rng_states())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "vocab" in checkpoint:
            UnifiedVocab.from_dict(checkpoint["vocab"], "checkpoint").check_compatible(
                self.vocab, "the checkpoint", "the configured tokenizers")
        rng = checkpoint.get("rng")
        if rng is None:
            return
        trainer = self._trainer  # (None when a checkpoint is loaded outside a fit)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        per_process = rng.get("per_process") or []
        if len(per_process) == world:
            _set_rng_states(per_process[rank])
        else:  # another number of processes (or a checkpoint from before per-process states): rank 0's stream
            torch.set_rng_state(rng["torch"])
            if world > 1:
                _seed_process(rank)
        self._rng_restored = True

    def on_fit_start(self) -> None:
        """Each process its own random stream (dropout): `seed_everything` gave every process the same one,
        so the rows of one global batch drew the same masks on every process. A resume restores the streams."""
        if self.trainer.world_size > 1 and not getattr(self, "_rng_restored", False):
            _seed_process(self.trainer.global_rank)
