"""A small Python API over a trained model: what the notebook, the CLI and the evaluation use.

    gen = Generator.load("runs/demo/train/checkpoints/last.ckpt")
    images = gen.generate_images(["a red circle left of a blue square"], n=4, cfg_scale=2.0)
    captions = gen.caption(images)
    text = gen.complete("a red")
    segments = gen.interleaved("two green squares")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from chameleon_lite.checkpoint import load_model
from chameleon_lite.generation.config import SamplingConfig
from chameleon_lite.generation.quantize import apply_quantize
from chameleon_lite.generation.sampler import Sampler
from chameleon_lite.model import ChameleonLM
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer, changed_tokenizer_files

log = logging.getLogger(__name__)

#: Text tokens `Generator.interleaved` leaves room for beside one image when no budget is given.
INTERLEAVED_TEXT_TOKENS = 64

#: Best-of-N score for candidate images: (the prompt index of each candidate, their codes (N, h * w)) -> N
#: scores, higher kept.
RerankFn = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def _check_candidates(candidates: int) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates={candidates!r} must be an int >= 1 (1 = no reranking)")


def _per_image(negative_prompts: Sequence[str | Sequence[str]], n_prompts: int, k: int) -> list[str]:
    """One negative text per drawn image, prompt-major: each prompt's entry (a text, or texts taken in turn)."""
    if isinstance(negative_prompts, str) or len(negative_prompts) != n_prompts:
        raise ValueError(f"negative_prompts must hold one entry per prompt ({n_prompts}), each a text or a "
                         f"list of texts; got {negative_prompts!r:.80}")
    out = []
    for i, entry in enumerate(negative_prompts):
        texts = [entry] if isinstance(entry, str) else list(entry)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"negative_prompts[{i}] = {entry!r:.80} must be a text or a non-empty list of texts")
        out += [texts[j % len(texts)] for j in range(k)]
    return out


@dataclass
class Segment:
    """One piece of generated interleaved output: ``text`` or ``image`` (float (3, H, W) in [0, 1])."""

    kind: str
    text: str | None = None
    image: torch.Tensor | None = None


class Generator:
    """Sampling tasks over a model and its tokenizers. ``quantize="int8"``: sample from an int8
    weight-only copy of the model (`chameleon_lite.generation.quantize`; faster batch-1 decoding on CPU,
    logits within ~1-2%); ``self.model`` stays the float model. ``compile``: each decode step as one
    ``torch.compile`` graph (`Sampler`; pays off for long or many sampling calls in one process).
    ``cuda_graphs``: on CUDA, each decode step recorded once as a CUDA graph and replayed (`Sampler`)."""

    def __init__(self, model: ChameleonLM, tokenizer: MultimodalTokenizer, quantize: str | None = None,
                 compile: bool = False, cuda_graphs: bool = False):
        self.model = model.eval()
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.builder = tokenizer.builder()
        self.meta: dict = {}  # what `load` read beside the weights (e.g. "training_data")
        self.sampler = Sampler(apply_quantize(self.model, quantize), tokenizer.vocab, tokenizer.tokens_per_image,
                               compile=compile, cuda_graphs=cuda_graphs)

    @classmethod
    def load(cls, ckpt: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", quantize: str | None = None, compile: bool = False,
             cuda_graphs: bool = False) -> Generator:
        """Load a ``.ckpt`` or exported model dir and its tokenizers (the dir recorded at training time
        unless ``tokenizer_dir`` is given); a vocab mismatch between the two is an error naming both.
        The model attends with SDPA whatever backend it trained with: sampling and scoring run padded or
        cached rows, which SDPA serves on every device (``attn_impl=xformers`` is a CUDA training backend;
        the packed rows of ``task=perplexity`` then use a dense document mask: same values, more memory)."""
        model, vocab, meta = load_model(ckpt, device=device)
        if model.cfg.attn_impl != "sdpa":
            model.cfg = replace(model.cfg, attn_impl="sdpa")
        tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
        if tok_dir is None:
            raise ValueError(f"{ckpt} does not record its tokenizer directory; pass tokenizer_dir=...")
        tok = MultimodalTokenizer.from_dir(Path(tok_dir), device=device)
        vocab.check_compatible(tok.vocab, f"checkpoint {ckpt}", f"tokenizers {tok_dir}")
        if changed := changed_tokenizer_files(meta.get("tokenizers"), tok_dir):
            log.warning("%s was trained with other %s than %s holds now (retrained in place, or another "
                        "tokenizer dir of the same vocab layout): prompts and images are read and written with "
                        "tokenizers the model does not know", ckpt, " / ".join(changed), tok_dir)
        gen = cls(model, tok, quantize=quantize, compile=compile, cuda_graphs=cuda_graphs)
        gen.meta = meta
        return gen

    # ------------------------------------------------------------------ tasks
    def generate_images(self, prompts: Sequence[str], n: int = 1, cfg_scale: float | None = 2.0,
                        temperature: float = 0.6, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                        batch_size: int = 16, candidates: int = 1,
                        negative_prompts: Sequence[str | Sequence[str]] | None = None,
                        negative_scale: float = 1.0, rerank: RerankFn | None = None) -> torch.Tensor:
        """Text -> image. Returns float images (len(prompts) * n, 3, H, W) in [0, 1], prompt-major.

        The defaults (CFG 2, image temperature 0.6) are conf/eval.yaml's, chosen on the shapes val split:
        at temperature 1 the many near-blank patches of an image each get a small chance to start a stray
        object; CFG above ~3 breaks shapes apart.

        ``candidates`` > 1: draw ``n * candidates`` images per prompt and keep the ``n`` whose codes make
        the prompt most likely as their caption, log p(prompt | image) under the model itself (best-of-N
        reranking, as DALL-E did with CLIP, here with the captioning direction of the same model; kept
        images stay in drawing order). ``rerank`` replaces that score: called with each candidate's prompt
        index and the candidates' codes, it returns one score per candidate, higher kept (`RerankFn`; e.g.
        `chameleon_lite.eval.geneval.scene_reranker`).

        ``negative_prompts``: per prompt, a text (or a list of texts, taken in turn by its images) that
        guidance steers away from with weight ``negative_scale`` (`SamplingConfig.negative_scale`; needs
        ``cfg_scale``). A negative that differs from its prompt in one attribute ("a red square" for "a
        red triangle") pushes towards what only the prompt says, here the triangle."""
        codes = self.generate_image_codes(prompts, n, cfg_scale, temperature, top_k, top_p, seed, batch_size,
                                          candidates, negative_prompts, negative_scale, rerank)
        return self.tok.decode_images(codes)

    def generate_image_codes(self, prompts: Sequence[str], n: int = 1, cfg_scale: float | None = 2.0,
                             temperature: float = 0.6, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                             batch_size: int = 16, candidates: int = 1,
                             negative_prompts: Sequence[str | Sequence[str]] | None = None,
                             negative_scale: float = 1.0, rerank: RerankFn | None = None) -> torch.Tensor:
        """`generate_images` before decoding: VQ codes (len(prompts) * n, h * w), prompt-major."""
        _check_candidates(candidates)
        if isinstance(prompts, str):
            raise TypeError(f"prompts={prompts!r} is one string: pass a list of prompts, e.g. [{prompts!r}] "
                             "(a string would be read as one prompt per character)")
        for name, value in (("n", n), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt, e.g. ['a red circle']")
        k = n * candidates
        ids = [self.builder.t2i_prompt(p) for p in prompts for _ in range(k)]
        negatives = None
        if negative_prompts is not None:
            negatives = [self.builder.t2i_prompt(t) for t in _per_image(negative_prompts, len(prompts), k)]
        cfg = SamplingConfig(max_new_tokens=self.tok.tokens_per_image + 1, image_temperature=temperature,
                             image_top_k=top_k, image_top_p=top_p, cfg_scale=cfg_scale,
                             negative_scale=None if negatives is None else negative_scale,
                             stop_ids=(self.vocab.eoi_id,), seed=seed)
        codes = []
        for start in range(0, len(ids), batch_size):
            for out in self.sampler.generate(ids[start:start + batch_size], replace(cfg, seed=seed + start),
                                             None if negatives is None else negatives[start:start + batch_size]):
                codes.append(self.vocab.ids_to_image(torch.tensor(out[: self.tok.tokens_per_image])))
        codes = torch.stack(codes)
        if candidates == 1:
            return codes
        if rerank is None:
            scores = self.prompt_log_likelihood([p for p in prompts for _ in range(k)], codes)
        else:
            scores = torch.as_tensor(rerank([i for i in range(len(prompts)) for _ in range(k)], codes),
                                     dtype=torch.float32)
            if scores.shape != (len(codes),):
                raise ValueError(f"rerank returned scores of shape {tuple(scores.shape)} for {len(codes)} "
                                 "candidates: return one score per candidate")
        keep = scores.view(len(prompts), k).topk(n, dim=1).indices.sort(dim=1).values  # (P, n), drawing order
        per_prompt = codes.view(len(prompts), k, *codes.shape[1:])
        return per_prompt[torch.arange(len(prompts))[:, None], keep].flatten(0, 1)

    def prompt_log_likelihood(self, texts: Sequence[str], codes: torch.Tensor) -> torch.Tensor:
        """log p(text | image) per (text, image codes) pair: the text as the image's caption (N,)."""
        return self.log_likelihood([self.builder.caption_prompt(c) for c in codes],
                                   [[*self.builder.text_ids(t), self.vocab.eos_id] for t in texts])

    def image_log_likelihood(self, texts: Sequence[str], codes: torch.Tensor) -> torch.Tensor:
        """log p(image | text) per (text, image codes) pair: the codes (and ``<eoi>``) after the text (N,)."""
        return self.log_likelihood([self.builder.t2i_prompt(t) for t in texts],
                                   [self.builder.image_ids(c)[1:] for c in codes])

    def caption(self, images, temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0,
                cfg_scale: float | None = None, candidates: int = 1,
                candidate_temperature: float = 1.0) -> list[str]:
        """Image -> text (greedy by default). ``images``: anything the image tokenizer encodes.
        ``cfg_scale``: text guidance against the caption's text prior (`SamplingConfig.text_cfg_scale`).

        ``candidates`` > 1: besides the caption drawn at ``temperature``, draw ``candidates - 1`` more at
        ``candidate_temperature`` and return, per image, the one under which the model finds the image
        most likely, log p(image | caption) (noisy-channel reranking: a caption that states more of what
        the image shows, e.g. where its two objects are, explains the image's codes better)."""
        _check_candidates(candidates)
        codes = self.tok.encode_images(images)
        prompts = [self.builder.caption_prompt(c) for c in codes]
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, text_temperature=temperature, allow_images=False,
                             text_cfg_scale=cfg_scale, seed=seed)
        drawn = [self.sampler.generate(prompts, cfg)]  # one list per draw, each with a row per image
        if candidates > 1:
            more = self.sampler.generate([p for p in prompts for _ in range(candidates - 1)],
                                         replace(cfg, text_temperature=candidate_temperature, seed=seed + 1))
            drawn += [more[j::candidates - 1] for j in range(candidates - 1)]
        texts = [[self.tok.decode_text(out).strip() for out in rows] for rows in drawn]
        if candidates == 1:
            return texts[0]
        repeated = codes.repeat(candidates, *[1] * (codes.dim() - 1))  # draw-major, as `texts`
        scores = self.image_log_likelihood([t for rows in texts for t in rows], repeated)
        best = scores.view(candidates, len(prompts)).argmax(dim=0).tolist()
        return [texts[j][i] for i, j in enumerate(best)]

    @torch.inference_mode()
    def log_likelihood(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       batch_size: int = 64) -> torch.Tensor:
        """log p(completion | prompt) under the model, summed over the completion's tokens: float32 (N,).

        Ids as the `SequenceBuilder` writes them; rows are right-padded, which causal attention never sees.
        Scores come from the float model ``self.model``, also when sampling runs int8 weights."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; "
                             "pass one of each per row")
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(prompts), batch_size):
            pairs = list(zip(prompts[start:start + batch_size], completions[start:start + batch_size]))
            width = max(len(p) + len(c) for p, c in pairs)
            ids = torch.full((len(pairs), width), self.vocab.pad_id, dtype=torch.long)
            counted = torch.zeros(len(pairs), width - 1, dtype=torch.bool)  # predicts ids[:, 1:]
            for row, (p, c) in enumerate(pairs):
                if not p or not c:
                    raise ValueError(f"row {start + row}: prompt and completion must both be non-empty")
                ids[row, : len(p) + len(c)] = torch.tensor([*p, *c])
                counted[row, len(p) - 1: len(p) + len(c) - 1] = True
            ids = ids.to(device)
            logp = self.model(ids[:, :-1]).float().log_softmax(-1)
            token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            scores.append(torch.where(counted.to(device), token_logp, 0.0).sum(1).cpu())
        return torch.cat(scores)

    def complete(self, text: str, max_new_tokens: int = 48, temperature: float = 0.0, seed: int = 0,
                 top_k: int = 0, top_p: float = 1.0) -> str:
        """Text -> text continuation (no images)."""
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, text_temperature=temperature, text_top_k=top_k,
                             text_top_p=top_p, allow_images=False, seed=seed)
        return self.tok.decode_text(self.sampler.generate([self.builder.text_prompt(text)], cfg)[0])

    def interleaved(self, text: str, max_new_tokens: int | None = None, text_temperature: float = 0.7,
                    image_temperature: float = 1.0, cfg_scale: float | None = None, seed: int = 0,
                    text_top_k: int = 0, text_top_p: float = 1.0, image_top_k: int = 0,
                    image_top_p: float = 1.0) -> list[Segment]:
        """Continue a document that may switch between text and images; returns its segments.

        ``max_new_tokens`` None: room for one image (``<boi>``, ``tokens_per_image`` codes, ``<eoi>``) and
        `INTERLEAVED_TEXT_TOKENS` text tokens, within the model's context. A budget that cannot hold one image
        is a logged warning: an image the model opens would always be cut. Top-k / top-p per modality as in
        `SamplingConfig` (0 / 1 = no filter)."""
        prompt = self.builder.text_prompt(text)
        image_tokens = self.tok.tokens_per_image + 2
        budget = max_new_tokens
        if budget is None:
            budget = max(1, min(image_tokens + INTERLEAVED_TEXT_TOKENS, self.model.cfg.max_seq_len - len(prompt)))
        if budget < image_tokens:
            given = (f"max_new_tokens={budget}" if max_new_tokens is not None else f"max_new_tokens=None ({budget}: "
                     f"what the model's max_seq_len={self.model.cfg.max_seq_len} leaves after the prompt)")
            log.warning("interleaved: %s cannot hold one image (<boi> + %d codes + <eoi> = %d tokens), so an image "
                        "the model opens will be cut: pass max_new_tokens >= %d (None: room for one image and %d "
                        "text tokens)", given, self.tok.tokens_per_image, image_tokens, image_tokens,
                        INTERLEAVED_TEXT_TOKENS)
        cfg = SamplingConfig(max_new_tokens=budget, text_temperature=text_temperature, text_top_k=text_top_k,
                             text_top_p=text_top_p, image_temperature=image_temperature, image_top_k=image_top_k,
                             image_top_p=image_top_p, allow_images=True, cfg_scale=cfg_scale, seed=seed)
        return self.split_segments(self.sampler.generate([prompt], cfg)[0])

    def split_segments(self, ids: Sequence[int]) -> list[Segment]:
        """Token ids -> text and image segments (complete images only; a truncated one is dropped
        with a text note so that nothing is lost silently). Text that decodes to nothing but whitespace
        (a trailing ``<eos>``, specials between two images) is no segment."""
        segments: list[Segment] = []
        text: list[int] = []
        i = 0
        n = self.tok.tokens_per_image
        while i < len(ids):
            if ids[i] == self.vocab.boi_id:
                if text:
                    segments.append(Segment("text", text=self.tok.decode_text(text)))
                    text = []
                codes = ids[i + 1:i + 1 + n]
                if len(codes) == n and all(self.vocab.is_image_id(c) for c in codes):
                    image = self.tok.decode_images(self.vocab.ids_to_image(torch.tensor([codes])))[0]
                    segments.append(Segment("image", image=image))
                else:
                    segments.append(Segment("text", text=f"[incomplete image: {len(codes)}/{n} codes]"))
                i += 1 + n + 1
                continue
            text.append(ids[i])
            i += 1
        if text:
            segments.append(Segment("text", text=self.tok.decode_text(text)))
        return [s for s in segments if s.kind == "image" or s.text.strip()]

