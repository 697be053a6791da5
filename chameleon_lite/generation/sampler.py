"""Sampler: batched prefill + static-KV-cache decoding, Chameleon's modality state machine, and CFG.

What to sample and what a stream yields (`SamplingConfig`, `StepEvent`, `Mode`) live in `config.py`; how
prompts are checked and become model rows, in `prompts.py`.

One decode step = one model call on the previous token of every row + a handful of tensor ops; rows
of a batch may sit in different modes at the same step. Per prompt, the state machine is one int
``left`` (B,):

- ``left == -1``  text mode: text ids, ``<eos>``, the stop ids and (``allow_images``) ``<boi>`` may be drawn;
- ``left > 0``    image mode: only image-code ids, ``left`` codes to go;
- ``left == 0``   the image is complete: ``<eoi>`` is forced, then text mode resumes.

Drawing ``<boi>`` sets ``left = tokens_per_image``; every image code decrements it. A prompt that ends in
``<boi>`` (text -> image) or inside an image starts in image mode. A row finishes at ``<eos>`` or a stop id
(the finishing token is part of its output) and then emits ``<pad>`` while the other rows go on.

Classifier-free guidance runs G = 2 to 4 rows per prompt in one batch, in blocks
``[conditional | image-conditioned | negative | unconditional]``, built from the prompts (`prompts.py`:
unconditional = ``<bos>`` + the prompt's open image, image-conditioned = its images without its text,
negative = a prompt the caller gives). The drawn token is fed to every row of its prompt, but guidance
rows keep only image context: a generated text token is written with ``token_mask`` False (never attended
to) and does not advance their positions. Guidance mixes the logits of image tokens only
(:func:`~chameleon_lite.generation.logits.mix_guidance`); text is drawn from the conditional row, as in
Chameleon.

Text guidance (``text_cfg_scale``, not in Chameleon) also guides text tokens: the unconditional row then
keeps every generated token, so for a captioning prompt it holds ``<bos>`` + the caption so far, the
text prior without the image, and words are drawn from ``u + s * (c - u)``: s > 1 favours what the image
supports over what the prior expects (classifier-free guidance for captioning, Kornblith et al. 2023,
arXiv 2307.16686). A colour-shape pair the training text never had ("a red triangle" when red triangles
were held out) is one the prior rules out; guidance lets whatever evidence the image gives through (on the
shapes world it did not raise caption accuracy: README Results).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chameleon_lite.generation.config import Mode, SamplingConfig, StepEvent, check_int
from chameleon_lite.generation.cuda_graphs import DecodeGraphs, error_line, new_decode_buffers
from chameleon_lite.generation.logits import gumbel_noise, mask_top_k_top_p, mix_guidance, pick_tokens
from chameleon_lite.generation.prompts import model_rows
from chameleon_lite.model import ChameleonLM, KVCache
from chameleon_lite.vocab import UnifiedVocab

log = logging.getLogger(__name__)

ALL_DONE_CHECK_EVERY = 16  # generate() reads "all rows finished?" back from the device every k steps
# KV cache slots are rounded up to a multiple of this: calls whose prompt + new tokens differ a little
# share cache shapes, so a compiled decode step is reused instead of recompiled (unused slots are masked).
CACHE_SLOTS_MULTIPLE = 64
# Compiled decode graphs one Sampler keeps (one per batch size x cache size x head slice); a call that would
# need one more decodes eagerly from then on (same tokens). Dynamo's own limit, 8, is reached by a session that
# samples a few batch sizes; past this one, new compiles (~10-20 s each on CPU) would cost more than they save.
COMPILED_GRAPHS_LIMIT = 64

# Internal mode index of a row, ``left.sign() + 1``: rows of `_Rules.bias` and of the per-mode parameters.
_TEXT, _END_IMAGE, _IMAGE = 0, 1, 2


def _recompile_limit() -> dict[str, Any]:
    """`torch.compile` arguments for this sampler's own graph count (torch >= 2.14 has them; before, dynamo's
    process-wide limit applies and `_RECOMPILE_LIMIT_HIT` still switches to eager decoding)."""
    wanted = {"recompile_limit": COMPILED_GRAPHS_LIMIT, "isolate_recompiles": True}
    accepted = inspect.signature(torch.compile).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


#: What dynamo raises (with ``fullgraph=True``) when a function would need a graph past its limit.
_RECOMPILE_LIMIT_HIT = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit",
                                                                           "FailOnCacheLimitHit")
                             if hasattr(torch._dynamo.exc, name))


def _scale_by_temperature(scores: Tensor, inv_temperature: Tensor) -> Tensor:
    """``scores`` (B, V) times ``inv_temperature`` (B,), finite. A row whose finite scores would overflow
    float32 (a temperature near 0: 1e-39, or 1e-37 beside scores ~40) is shifted by its max first: the same
    distribution with the top score at 0 and the rest far below, so it draws the greedy token rather than one
    of several ids at inf. Other rows are scaled as they are, bit for bit."""
    scaled = scores * inv_temperature[:, None]
    overflow = (scores.isfinite() & ~scaled.isfinite()).any(dim=-1, keepdim=True)  # (B, 1)
    shifted = (scores - scores.amax(dim=-1, keepdim=True)) * inv_temperature[:, None]
    return torch.where(overflow, shifted, scaled)



@dataclass
class _Rules:
    """What a `SamplingConfig` means for one call, as device tensors indexed by the mode index."""

    bias: Tensor  # (3, V) float: 0 where the mode allows an id, -inf elsewhere
    inv_temperature: Tensor  # (3,) float: 1 / T (at most float32's max), 1 for greedy modes
    sample: Tensor  # (3,) bool: draw (T > 0) rather than argmax
    top_k: Tensor  # (3,) int64
    top_p: Tensor  # (3,) float
    stop: Tensor  # (V,) bool: ids that finish a row
    image_context: Tensor  # (V,) bool: ids that guidance rows keep (<bos> <boi> <eoi> codes)
    any_sample: bool
    any_filter: bool


@dataclass
class _Decoding:
    """Mutable state of one generate/stream call. B prompts, G rows per prompt, N = max_new_tokens."""

    cfg: SamplingConfig
    rules: _Rules
    cache: KVCache
    generator: torch.Generator
    logits: Tensor  # (G*B, V) float32: next-token logits of every model row
    positions: Tensor  # (G*B,) int64: RoPE position of the next token fed to each model row
    left: Tensor  # (B,) int64: the modality state (module docstring)
    done: Tensor  # (B,) bool
    lengths: Tensor  # (B,) int64: tokens produced, the finishing one included
    out: Tensor  # (B, N) int64, <pad> where nothing was produced
    previous: Tensor | None = None  # (B,) int64: the tokens of the last step, fed to the model next


class Sampler:
    """Draws new tokens for token-id prompts from a `ChameleonLM` (see the module docstring).

    ``tokens_per_image``: image codes between ``<boi>`` and ``<eoi>`` (the VQ grid size, e.g. 1024 for 512 px
    at f=16). ``compile``: run each decode step (model call, guidance, masking, picking, state machine) as
    one ``torch.compile`` graph. The KV cache has fixed shapes while decoding (`KVCache.fix_shapes`), so
    one graph serves every step of a head slice (text ids, image codes, ``<eoi>``) for one batch size and
    cache size (prompt + new tokens, rounded up to `CACHE_SLOTS_MULTIPLE`); each is compiled on first use,
    ~10-20 s on 2 CPU cores, on CPU with inductor's C++ wrapper. Same tokens as eager. Batch-1 decoding on
    CPU: 1.3x eager with fp32 weights, 3.2x with int8 ones (``benchmarks/bench_decode.py``). A step that
    would need more than `COMPILED_GRAPHS_LIMIT` graphs switches the sampler to eager decoding, with one
    logged warning, as does a step that torch.compile fails to build (a compiler bug: torch 2.11's Triton
    failed on one fused kernel of it on an H100).

    ``cuda_graphs`` (CUDA only; ignored elsewhere): record each decode step, eager or compiled, as a CUDA
    graph once per shape, head slice and guidance setting, then replay it: one launch per step instead of
    one per kernel, which is what small models decode at on a GPU. Same tokens as eager. The decode buffers
    (KV cache, positions) then stay allocated between calls (`cuda_graphs.py`: `MAX_BUFFER_SETS` shapes, up to
    `MAX_GRAPHS_PER_SET` graphs each), so the graphs recorded on them replay in later calls; `clear_buffers`
    frees them. A step that cannot be recorded decodes eagerly, with one logged warning. Recorded graphs
    read the model's weights where they are: after moving or casting the model, make a new sampler.
    """

    def __init__(self, model: ChameleonLM, vocab: UnifiedVocab, tokens_per_image: int, compile: bool = False,
                 cuda_graphs: bool = False):
        if model.cfg.vocab_size != vocab.size:
            raise ValueError(f"the model has vocab_size={model.cfg.vocab_size} but the vocab has size "
                             f"{vocab.size} ({vocab.layout.describe()}): use the vocab the model was "
                             "trained with")
        check_int("tokens_per_image", tokens_per_image, minimum=1)
        self.model, self.vocab, self.tokens_per_image = model, vocab, tokens_per_image
        self._decode_call = self._feed_and_draw
        device = next(model.parameters()).device
        # CUDA graphs replay a step's kernels reading and writing fixed addresses: the decode state that steps
        # write in place (KV cache, positions) then lives in buffers kept across calls, one set per shape
        self._graphs = DecodeGraphs(model) if cuda_graphs and device.type == "cuda" else None
        if cuda_graphs and self._graphs is None:
            log.warning("cuda_graphs=True is ignored: the model is on %s, and CUDA graphs record CUDA work only",
                        device)
        if compile:  # fixed shapes (KVCache.fix_shapes): one graph per head slice, compiled on first use
            options = {"cpp_wrapper": True} if device.type == "cpu" else {}
            self._compiled_feed_and_draw = torch.compile(
                self._feed_and_draw, fullgraph=True, dynamic=False, options=options, **_recompile_limit())
            self._decode_call = self._compiled_or_eager_feed_and_draw

    # ----------------------------------------------------------------------------------- public API
    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                 negatives: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
        """New token ids per prompt (prompt excluded, finishing ``<eos>``/stop id included, no padding).

        ``negatives``: one negative prompt per prompt, needed exactly when ``cfg.negative_scale`` is set; each
        must leave the same image open as its prompt (for text -> image both end in ``<boi>``)."""
        run = self._prefill(prompts, cfg, negatives)
        try:
            for step in range(cfg.max_new_tokens):
                self._step(run, step)
                if (step + 1) % ALL_DONE_CHECK_EVERY == 0 and bool(run.done.all()):
                    break
            return [row[:n] for row, n in zip(run.out.tolist(), run.lengths.tolist())]
        finally:
            self._release(run.cache)

    def stream(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
               negatives: Sequence[Sequence[int]] | None = None) -> Iterator[StepEvent]:
        """Yield one `StepEvent` per decode step as soon as it is drawn, until every row has finished.

        Same tokens as `generate` for the same arguments. Each event reads the step back to the host.
        """
        run = self._prefill(prompts, cfg, negatives)
        try:
            for step in range(cfg.max_new_tokens):
                tokens, mode_index, was_done = self._step(run, step)
                modes = torch.where(was_done, Mode.DONE, (mode_index != _TEXT).long())
                finished = run.done.tolist()
                yield StepEvent(step, tokens.tolist(), [Mode(m) for m in modes.tolist()], finished)
                if all(finished):
                    return
        finally:  # also when the caller stops early (close() or garbage collection of the generator)
            self._release(run.cache)

    # ----------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def _prefill(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                 negatives: Sequence[Sequence[int]] | None = None) -> _Decoding:
        """Validate, left-pad all model rows, run the prompt through the model once, set up the state."""
        cfg_model = self.model.cfg
        if self.model.training and (cfg_model.attn_dropout or cfg_model.resid_dropout):
            raise ValueError(f"the model is in training mode with dropout (attn_dropout="
                             f"{cfg_model.attn_dropout}, resid_dropout={cfg_model.resid_dropout}): "
                             "call model.eval() before sampling")
        # guidance blocks: [conditional | image-conditioned | negative | unconditional]
        rows, left = model_rows(prompts, negatives, cfg, self.vocab, self.tokens_per_image,
                                cfg_model.max_seq_len)

        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.vocab.pad_id, dtype=torch.long)
        token_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        lengths = torch.tensor([len(r) for r in rows])
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            token_mask[r, width - len(row):] = True
        positions = (torch.arange(width) - (width - lengths)[:, None]).clamp(min=0)  # (G*B, width)

        slots = -(-(width + cfg.max_new_tokens - 1) // CACHE_SLOTS_MULTIPLE) * CACHE_SLOTS_MULTIPLE
        if self.cuda_graphs:  # kept buffers: the graphs recorded on them replay
            cache, next_positions = self._graphs.claim(len(rows), slots, device)
        else:
            cache, next_positions = new_decode_buffers(self.model, len(rows), slots, device)
        try:
            logits = self.model(ids.to(device), positions=positions.to(device), kv_cache=cache,
                                token_mask=token_mask.to(device), logits_to_keep=1)[:, -1].float()
        except BaseException:  # out of memory, an interrupt: the kept buffers must not stay claimed
            self._release(cache)
            raise
        cache.fix_shapes()  # every decode step now has the same shapes (one compiled graph)
        next_positions.copy_(lengths)
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
        n = len(left)
        return _Decoding(
            cfg=cfg, rules=self._rules(cfg, device, images_reachable=cfg.allow_images or max(left) >= 0),
            cache=cache, generator=generator, logits=logits,
            positions=next_positions, left=torch.tensor(left, device=device),
            done=torch.zeros(n, dtype=torch.bool, device=device),
            lengths=torch.zeros(n, dtype=torch.long, device=device),
            out=torch.full((n, cfg.max_new_tokens), self.vocab.pad_id, dtype=torch.long, device=device),
        )

    def _rules(self, cfg: SamplingConfig, device: torch.device, images_reachable: bool) -> _Rules:
        """Tensors of `_Rules`. Without reachable image mode (no ``<boi>`` allowed, no open image), the image
        parameters are never used: they must not switch on noise or filtering."""
        v = self.vocab
        text = v.text_mask(device)
        text[[v.eos_id, *(i for i in cfg.stop_ids if i != v.eoi_id)]] = True
        if cfg.allow_images:
            text[v.boi_id] = True
        end_image = torch.zeros_like(text)
        end_image[v.eoi_id] = True
        allowed = torch.stack([text, end_image, v.image_mask(device)])  # rows: _TEXT, _END_IMAGE, _IMAGE
        bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
        stop = torch.zeros_like(text)
        stop[[v.eos_id, *cfg.stop_ids]] = True
        image_context = v.image_mask(device)
        image_context[[v.bos_id, v.boi_id, v.eoi_id]] = True
        temperature = torch.tensor([cfg.text_temperature, 0.0, cfg.image_temperature], device=device)
        inv_temperature = (1.0 / temperature).clamp(max=torch.finfo(temperature.dtype).max)  # 1 / 1e-39: inf
        top_k = torch.tensor([cfg.text_top_k, 0, cfg.image_top_k], device=device)
        top_p = torch.tensor([cfg.text_top_p, 1.0, cfg.image_top_p], device=device)
        used = [_TEXT, _IMAGE] if images_reachable else [_TEXT]
        return _Rules(
            bias=bias, inv_temperature=torch.where(temperature > 0, inv_temperature, 1.0),
            sample=temperature > 0, top_k=top_k, top_p=top_p, stop=stop, image_context=image_context,
            any_sample=bool((temperature[used] > 0).any()),
            any_filter=bool((top_k[used] > 0).any() or (top_p[used] < 1).any()),
        )

    # ----------------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def _step(self, run: _Decoding, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Feed the previous step's tokens (step > 0), draw this step's, advance the state machine.

        The feed and the draw are one call, `_feed_and_draw` (compiled with ``compile=True``); the Gumbel
        noise (drawn from the sampler's generator) and the head slice (read from the modes on the host)
        are its inputs. Returns the tokens (B,), the mode index each was drawn in (B,), and which rows had
        finished before.
        """
        rules, n = run.rules, run.left.shape[0]
        noise = gumbel_noise((n, self.vocab.size), run.generator, run.left.device) if rules.any_sample else None
        was_done = run.done
        if step == 0:  # the prefill's logits
            tokens, mode, run.done, run.left = self._draw(run, run.logits, noise)
        else:
            head = self._head_slice(run.left)
            graph = self._graphs.step_graph(lambda: self._decode_call, run, head, noise) if self.cuda_graphs else None
            if graph is not None:
                outputs = graph(run, run.previous, noise)
            else:
                outputs = self._decode_call(run, run.previous, head, noise)
            run.logits, tokens, mode, run.done, run.left = outputs
        run.out[:, step] = tokens
        run.previous = tokens  # a contiguous (B,) tensor, as the compiled step was traced with
        run.lengths += ~was_done
        return tokens, mode, was_done

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are replayed as CUDA graphs (asked for, on CUDA, and no recording failed)."""
        return self._graphs is not None and self._graphs.enabled

    def clear_buffers(self) -> None:
        """Free the decode buffers and CUDA graphs kept for later calls (`cuda_graphs`)."""
        if self._graphs is not None:
            self._graphs.clear()

    def _release(self, cache: KVCache) -> None:
        if self._graphs is not None:
            self._graphs.release(cache)

    def _compiled_or_eager_feed_and_draw(self, run: _Decoding, previous: Tensor, head: slice | None,
                                         noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`_feed_and_draw` through its compiled graphs; from the first step that would need a graph past
        `COMPILED_GRAPHS_LIMIT` (or dynamo's process-wide cap), or that the compiler fails to build, eagerly.
        Both fail before the graph runs anything, so the step then runs once, eagerly, on the untouched state."""
        try:
            return self._compiled_feed_and_draw(run, previous, head, noise)
        except _RECOMPILE_LIMIT_HIT:
            log.warning("compiled decoding reached its limit of graphs (COMPILED_GRAPHS_LIMIT=%d, one per batch "
                        "size, cache size and head slice): this sampler decodes eagerly from now on (same "
                        "tokens, slower); sample with fewer distinct batch sizes to stay compiled",
                        COMPILED_GRAPHS_LIMIT)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            log.warning("torch.compile failed to build a decode step (%s): this sampler decodes eagerly from now "
                        "on (same tokens, slower); compile=false avoids the attempt", error_line(err))
        self._decode_call = self._feed_and_draw
        return self._feed_and_draw(run, previous, head, noise)

    def _feed_and_draw(self, run: _Decoding, previous: Tensor, head: slice | None,
                       noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One decode step on tensors only (no host reads, fixed shapes): `_feed`, then `_draw`.
        Returns the new logits and `_draw`'s tuple."""
        logits = self._feed(run, previous, head)
        return (logits, *self._draw(run, logits, noise))

    def _draw(self, run: _Decoding, logits: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw one token per prompt from the (G*B, V) logits of all model rows.

        Returns the tokens (``<pad>`` for finished rows), the mode index they were drawn in, and the new
        ``done`` and ``left`` (the state machine after the tokens); ``run`` is not modified.
        """
        rules, n, left = run.rules, run.left.shape[0], run.left
        mode = left.sign() + 1  # (B,) _TEXT / _END_IMAGE / _IMAGE
        scores, cfg = logits[:n], run.cfg
        if cfg.cfg_scale is not None:
            guided = mix_guidance(logits, cfg.cfg_scale, cfg.cfg_image_scale, cfg.negative_scale)
            scores = torch.where((mode == _IMAGE)[:, None], guided, scores)
        if cfg.text_cfg_scale is not None:  # [conditional | unconditional] blocks, the first and the last
            guided = mix_guidance(torch.cat([logits[:n], logits[-n:]]), cfg.text_cfg_scale, None)
            scores = torch.where((mode == _TEXT)[:, None], guided, scores)
        scores = scores + rules.bias[mode]  # (B, V), disallowed ids at -inf
        if rules.any_sample:
            scores = _scale_by_temperature(scores, rules.inv_temperature[mode])
        if rules.any_filter:
            scores = mask_top_k_top_p(scores, rules.top_k[mode], rules.top_p[mode])
        tokens = pick_tokens(scores, rules.sample[mode], noise).masked_fill(run.done, self.vocab.pad_id)
        done = run.done | rules.stop[tokens]
        left = torch.where(tokens == self.vocab.boi_id, self.tokens_per_image, left - (left >= 0).long())
        return tokens, mode, done, left

    def _feed(self, run: _Decoding, tokens: Tensor, head: slice | None) -> Tensor:
        """One model call on ``tokens`` (B,) for all G*B rows; guidance rows (image-conditioned, negative,
        unconditional) keep only image context (the unconditional row keeps everything under text guidance).
        Returns the next-token logits (G*B, V) float32 (ids outside ``head`` at 0: every row's mode
        disallows them, the bias sets them to -inf)."""
        g = run.cfg.guidance_rows
        keep: Tensor | int = 1
        if g > 1:
            every, image_context = torch.ones_like(tokens, dtype=torch.bool), run.rules.image_context[tokens]
            unconditional = every if run.cfg.text_cfg_scale is not None else image_context
            keep = torch.cat([every, *[image_context] * (g - 2), unconditional])
        logits = self.model(tokens.repeat(g)[:, None], positions=run.positions[:, None], kv_cache=run.cache,
                            token_mask=None if g == 1 else keep[:, None], logits_to_keep=1,
                            vocab_slice=head)[:, -1].float()
        run.positions += keep
        if head is None:
            return logits
        full = logits.new_zeros((logits.shape[0], self.vocab.size))
        full[:, head] = logits
        return full

    def _head_slice(self, left: Tensor) -> slice | None:
        """The contiguous id range that holds every id the rows may draw next, when all rows are in the
        same mode: text mode -> specials + text ids, image mode -> the image codes, image complete ->
        ``<eoi>``. None (the whole head) for rows in mixed modes, and on accelerators, where reading
        the modes back to the host every step would cost more than the head rows it saves."""
        if left.device.type != "cpu":
            return None
        low, high = int(left.min()), int(left.max())
        v = self.vocab
        if high < 0:
            return slice(0, v.image_offset)
        if low > 0:
            return slice(v.image_offset, v.image_offset + v.n_image)
        if low == high == 0:
            return slice(v.eoi_id, v.eoi_id + 1)
        return None
