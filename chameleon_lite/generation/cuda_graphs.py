"""CUDA-graph decoding for ``Sampler(cuda_graphs=True)``.

A small model decodes at the speed of its kernel launches on a GPU: eager, one decode step is a few hundred
launches of tiny kernels. `DecodeGraphs` records each step once as a CUDA graph and replays it, one launch
per step (8.4x eager batch-1 decoding on an H100, benchmarks/RESULTS.md). A graph reads and writes fixed
addresses, so the decode state a step writes in place (the KV cache and positions) lives in buffers kept
across sampling calls, one set per (model rows, cache slots) shape; the per-call inputs (previous tokens,
noise, modality state, rules) are copied into the graph's own tensors before each replay.

Recorded graphs read the model's weights where they were at recording: after moving or casting the model,
make a new sampler.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from chameleon_lite.model import ChameleonLM, KVCache

if TYPE_CHECKING:
    from chameleon_lite.generation.sampler import _Decoding

log = logging.getLogger(__name__)

# Decode buffer sets kept, one per (model rows, cache slots) shape, least recently used dropped first.
MAX_BUFFER_SETS = 4
# Recorded steps kept per buffer set (one per head slice x guidance setting x sampling/filtering); the least
# recently used is dropped past this, so a sweep over guidance scales does not pile graphs up.
MAX_GRAPHS_PER_SET = 16


def new_decode_buffers(model: ChameleonLM, rows: int, slots: int,
                       device: torch.device) -> tuple[KVCache, Tensor]:
    """An empty KV cache of ``rows`` x ``slots`` and a (rows,) int64 positions tensor."""
    return model.init_kv_cache(rows, slots, device=device), torch.zeros(rows, dtype=torch.long, device=device)


def error_line(err: BaseException) -> str:
    """The line of a (compiler, CUDA) error that says what failed: its last ``SomeError: ...`` line, else its
    first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return named[-1] if named else (lines[0] if lines else type(err).__name__)


@dataclass
class KeptBuffers:
    """The decode buffers kept for one shape; ``busy``: a call is decoding in them; ``graphs``: the steps
    recorded on them (`StepGraph.key`, least recently used first)."""

    cache: KVCache
    positions: Tensor
    busy: bool = False
    graphs: dict[tuple, StepGraph] = field(default_factory=dict)


class StepGraph:
    """One decode step (``step()`` returns the function in use: the sampler's eager step or its compiled
    graph) recorded as a CUDA graph on the device of the kept buffers.

    It reads its own copies of the per-call inputs, refreshed before each replay, and the kept KV cache and
    positions, which it advances in place as the eager step does. Recording first runs the step once on a
    side stream (lazy initialisation must not happen during capture), then rewinds the state that run
    advanced; the slot it wrote is written again by the first replay. `_warm_up` and `_record` are the only
    CUDA calls (tests run the rest on the CPU with stand-ins that execute the step at each replay)."""

    def __init__(self, step: Callable[[], Callable], run: _Decoding, previous: Tensor, head: slice | None,
                 noise: Tensor | None):
        rules = replace(run.rules, **{name: getattr(run.rules, name).clone() for name in _tensor_fields(run.rules)})
        # only what the step reads: not the call's logits, output or generator
        self.run = replace(run, left=run.left.clone(), done=run.done.clone(), rules=rules, logits=None, out=None,
                           lengths=None, generator=None)
        self.rules_of = run.rules  # the rules object last copied in
        self.previous, self.noise = previous.clone(), None if noise is None else noise.clone()
        cache = run.cache
        advanced = [t for t in (cache.length, run.positions, cache.image_run) if t is not None]
        saved = [t.clone() for t in advanced]

        def call() -> tuple[Tensor, ...]:  # `step()` each time: a compiled step that failed to build is now eager
            return step()(self.run, self.previous, head, self.noise)

        try:
            self._warm_up(call, cache.valid.device)
        finally:
            for tensor, value in zip(advanced, saved):
                tensor.copy_(value)
        self.replay, self.outputs = self._record(call, cache.valid.device)

    @staticmethod
    def _warm_up(call: Callable[[], Any], device: torch.device) -> None:
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                call()
            torch.cuda.current_stream(device).wait_stream(side)

    @staticmethod
    def _record(call: Callable[[], tuple[Tensor, ...]],
                device: torch.device) -> tuple[Callable[[], None], Sequence[Tensor]]:
        """Capture ``call`` on ``device`` (not whichever device is current); return the replay and the
        graph's output tensors."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            outputs = call()

        def replay() -> None:
            with torch.cuda.device(device):
                graph.replay()

        return replay, outputs

    @staticmethod
    def key(run: _Decoding, head: slice | None, noise: Tensor | None) -> tuple:
        """What a recorded step depends on beyond tensor values: the head slice, the guidance rows and
        scales, and which optional ops run (the shapes are those of the buffers the graph belongs to)."""
        c, r = run.cfg, run.rules
        head_key = None if head is None else (head.start, head.stop)
        return (head_key, noise is not None, c.cfg_scale, c.cfg_image_scale, c.negative_scale, c.text_cfg_scale,
                r.any_sample, r.any_filter)

    def __call__(self, run: _Decoding, previous: Tensor, noise: Tensor | None) -> tuple[Tensor, ...]:
        mine = self.run
        if run.rules is not self.rules_of:
            for name in _tensor_fields(run.rules):
                getattr(mine.rules, name).copy_(getattr(run.rules, name))
            self.rules_of = run.rules
        mine.left.copy_(run.left)
        mine.done.copy_(run.done)
        self.previous.copy_(previous)
        if noise is not None:
            self.noise.copy_(noise)
        self.replay()
        return tuple(t.clone() for t in self.outputs)  # the next replay overwrites the graph's own


def _tensor_fields(rules: Any) -> list[str]:
    return [f.name for f in fields(rules) if isinstance(getattr(rules, f.name), Tensor)]


class DecodeGraphs:
    """The kept decode buffers and recorded steps of one sampler. ``enabled`` turns False (for good) when a
    step fails to record; the sampler then decodes eagerly."""

    def __init__(self, model: ChameleonLM):
        self.model = model
        self.enabled = True
        self.buffers: dict[tuple[int, int], KeptBuffers] = {}
        self._said_busy = False

    def claim(self, rows: int, slots: int, device: torch.device) -> tuple[KVCache, Tensor]:
        """An empty KV cache of ``rows`` x ``slots`` and a (rows,) int64 positions tensor: the ones of the last
        call of this shape, reset (the graphs recorded on them then replay as they are), claimed until
        `release`; or new ones (no graphs) while an unfinished call, such as a `stream` not read to its end,
        holds them."""
        key = (rows, slots)
        kept = self.buffers.get(key)
        if kept is not None and kept.busy:
            if not self._said_busy:
                log.info("a sampling call started while another of the same shape was unfinished (a stream not "
                         "read to its end?): it decodes in new buffers, without CUDA graphs")
                self._said_busy = True
            return new_decode_buffers(self.model, rows, slots, device)
        if kept is None:
            kept = KeptBuffers(*new_decode_buffers(self.model, rows, slots, device))
        else:
            kept.cache.reset()
        self.buffers.pop(key, None)
        self.buffers[key] = kept  # most recent last
        kept.busy = True
        while len(self.buffers) > MAX_BUFFER_SETS:
            self.buffers.pop(next(iter(self.buffers)))
        return kept.cache, kept.positions

    def release(self, cache: KVCache) -> None:
        """The call decoding in ``cache`` has ended (or failed): its kept buffers may serve the next call."""
        for kept in self.buffers.values():
            if kept.cache is cache:
                kept.busy = False

    def clear(self) -> None:
        """Free the kept buffers and their graphs; later calls allocate and record again."""
        self.buffers.clear()

    def step_graph(self, step: Callable[[], Callable], run: _Decoding, head: slice | None,
                   noise: Tensor | None) -> StepGraph | None:
        """The recorded step for this call's buffers, recorded now if new; None if the call decodes in buffers
        that are not kept, or recording failed (then graphs are off for good, with one warning)."""
        kept = self.buffers.get((run.positions.shape[0], run.cache.max_len))
        if kept is None or kept.cache is not run.cache:
            return None
        key = StepGraph.key(run, head, noise)
        graph = kept.graphs.pop(key, None)
        if graph is None:
            try:
                graph = StepGraph(step, run, run.previous, head, noise)
            except Exception as err:  # noqa: BLE001 - any capture failure: decode as before, say why once
                if run.cache.valid.is_cuda:
                    torch.cuda.synchronize(run.cache.valid.device)
                cause = f"; during: {error_line(err.__context__)}" if err.__context__ is not None else ""
                log.warning("CUDA-graph decoding is off for this sampler: recording a decode step failed (%s%s); "
                            "decoding without graphs (same tokens, slower)", error_line(err), cause)
                self.enabled = False
                self.clear()  # the failing call keeps its own references
                return None
        kept.graphs[key] = graph  # most recently used last
        while len(kept.graphs) > MAX_GRAPHS_PER_SET:
            kept.graphs.pop(next(iter(kept.graphs)))
        return graph
