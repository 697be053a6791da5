"""Decoding speed of chameleon-lite's `Sampler`, against the references it must beat.

1. Batch-1 greedy text decoding, tokens/s: `Sampler.generate` against Hugging Face's
   `ChameleonForConditionalGeneration.generate` (greedy, KV cache) at the same shape, with the same
   weights (`chameleon_lite.interop.hf.to_hf`; the largest logit difference of the two is printed as a check).
2. Text -> image with classifier-free guidance at batch B (2B model rows), images/s: `Sampler.generate`
   against a naive loop that re-runs the full forward over the whole sequence for every token
   (no KV cache; same guidance, masking and sampling ops).

Runs of the engines are alternated round by round in this one process, so a noisy (shared) CPU slows
both alike; each row reports the median over rounds, the ratio is the median of per-round ratios,
by wall clock and by this process's CPU time (steadier when other jobs share the cores).
Never asserted anywhere: this prints a Markdown table.

    python benchmarks/bench_decode.py              # reference shape: dim 256, 4 layers, 4 heads, vocab 8192
    python benchmarks/bench_decode.py --no-compile # without the compiled-step rows (`Sampler(compile=True)`)
    python benchmarks/bench_decode.py --no-int8    # without the int8 weight-only rows

Compiled rows (`Sampler(compile=True)`: each decode step one torch.compile graph) are warmed up once before
timing; the compile time of their graphs is printed separately.

The int8 row (`Generator.load(..., quantize="int8")`) is a different numeric model: the script prints how
many of its greedy tokens equal the fp32 sampler's and its largest relative logit error.
    python benchmarks/bench_decode.py --quick      # seconds: smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from chameleon_lite.generation import Sampler, SamplingConfig
from chameleon_lite.generation.logits import gumbel_noise, mix_guidance, pick_tokens
from chameleon_lite.generation.quantize import quantize_int8
from chameleon_lite.interop.hf import to_hf
from chameleon_lite.model import ChameleonLM, ModelConfig
from chameleon_lite.vocab import UnifiedVocab


def reference_setup(max_seq_len: int, device: str = "cpu") -> tuple[ChameleonLM, UnifiedVocab]:
    """The reference shape: dim 256, 4 layers, 4 heads, vocab 8192 (4080 text ids, 4096 image codes),
    HF's per-head QK-norm layout, random weights."""
    vocab = UnifiedVocab(n_text=4080, n_image=4096)
    cfg = ModelConfig(vocab_size=vocab.size, dim=256, n_layers=4, n_heads=4, qk_norm_per_head=True,
                      max_seq_len=max_seq_len)
    torch.manual_seed(0)
    return ChameleonLM(cfg).to(device).eval(), vocab


@torch.inference_mode()
def max_logit_difference(model: ChameleonLM, hf: nn.Module, vocab: UnifiedVocab, ids: torch.Tensor) -> float:
    """Largest |logit difference| over non-image ids (HF sets image-code logits to the dtype minimum)."""
    text = ~vocab.image_mask(ids.device)
    return (model(ids)[..., text] - hf(input_ids=ids).logits[..., text]).abs().max().item()


@torch.inference_mode()
def naive_text_to_image(model: ChameleonLM, vocab: UnifiedVocab, prompts: list[list[int]],
                        tokens_per_image: int, cfg_scale: float, seed: int) -> list[list[int]]:
    """The no-cache baseline: every new token re-runs the model over the whole left-padded sequence.

    Rows [prompts | `<bos> <boi>` unconditional]; image codes drawn at temperature 1 from the guided
    logits, then the forced `<eoi>`. Same ops as the sampler except the KV cache.
    """
    device = next(model.parameters()).device
    rows = prompts + [[vocab.bos_id, vocab.boi_id]] * len(prompts)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[vocab.pad_id] * (width - len(r)) + r for r in rows], device=device)
    token_mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    positions = (torch.cumsum(token_mask, dim=1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    bias = torch.zeros(vocab.size, device=device).masked_fill_(~vocab.image_mask(device), float("-inf"))
    sample = torch.ones(len(prompts), dtype=torch.bool, device=device)
    for _ in range(tokens_per_image):
        logits = model(ids, positions=positions, token_mask=token_mask, logits_to_keep=1)[:, -1].float()
        logits = mix_guidance(logits, cfg_scale, None) + bias
        tokens = pick_tokens(logits, sample, gumbel_noise(tuple(logits.shape), generator, logits.device))
        ids = torch.cat([ids, tokens.repeat(2)[:, None]], dim=1)
        token_mask = torch.cat([token_mask, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    return [row[width:] + [vocab.eoi_id] for row in ids[: len(prompts)].tolist()]


@dataclass
class Rates:
    """Units per second of one engine, one value per round, by wall clock and by this process's CPU time
    (the CPU-time rate ignores the time the process waited for a core on a shared machine)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def alternate(engines: dict[str, Callable[[], int]], rounds: int, warm: set[str],
              warm_seconds: dict[str, float] | None = None) -> dict[str, Rates]:
    """Run each engine once per round, in turn (an engine returns the units it made: tokens, images).

    Engines named in `warm` first run once unmeasured (allocator, lazy init, torch.compile), the wall
    time of that run is stored in `warm_seconds`; the naive loop is not warmed: one run of it is long
    enough to drown its first-call costs.
    """
    for name in warm:
        start = time.perf_counter()
        engines[name]()
        if warm_seconds is not None:
            warm_seconds[name] = time.perf_counter() - start
    rates = {name: Rates() for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            units = run()
            rates[name].wall.append(units / (time.perf_counter() - wall))
            rates[name].cpu.append(units / (time.process_time() - cpu))
    return rates


def table(title: str, unit: str, rates: dict[str, Rates], reference: str) -> str:
    """Markdown: median rate by wall clock and by CPU time, and the median per-round ratio to `reference`."""
    ref = rates[reference]
    lines = [f"| {title} | {unit} (wall) | {unit} (CPU time) | ratio (wall) | ratio (CPU time) |",
             "|---|---|---|---|---|"]
    for name, r in rates.items():
        ratio_wall = statistics.median(a / b for a, b in zip(r.wall, ref.wall))
        ratio_cpu = statistics.median(a / b for a, b in zip(r.cpu, ref.cpu))
        lines.append(f"| {name} | {statistics.median(r.wall):.3g} | {statistics.median(r.cpu):.3g} | "
                     f"{ratio_wall:.2f}x | {ratio_cpu:.2f}x |")
    return "\n".join(lines)


def random_prompt(vocab: UnifiedVocab, length: int, ends_in_boi: bool) -> list[int]:
    """`<bos>` + random text ids (+ `<boi>`): `length` tokens in all."""
    n_text = length - 1 - ends_in_boi
    text = vocab.text_to_ids(torch.randint(0, vocab.n_text, (n_text,)).tolist())
    return [vocab.bos_id, *text] + [vocab.boi_id] * ends_in_boi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny counts)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the batch-1 decode comparison")
    parser.add_argument("--image-rounds", type=int, default=1, help="rounds of the text -> image comparison")
    parser.add_argument("--new-tokens", type=int, default=256, help="greedy decode length (batch 1)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="text -> image prompts (x2 rows with CFG)")
    parser.add_argument("--tokens-per-image", type=int, default=256)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled-step rows (Sampler(compile=True))")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 weight-only row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: also rows with CUDA graphs)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.image_rounds, args.new_tokens, args.batch, args.tokens_per_image = 1, 1, 16, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)

    model, vocab = reference_setup(max_seq_len=2048, device=args.device)
    hf = to_hf(model, vocab).to(args.device)  # same weights; HF's vocabulary_map names our image block
    prompt = random_prompt(vocab, args.prompt_len, ends_in_boi=False)
    hf_ids = torch.tensor([prompt], device=args.device)
    check = max_logit_difference(model, hf, vocab, hf_ids)
    fp32_name, int8_name = "chameleon-lite Sampler", "chameleon-lite Sampler, int8 weight-only"
    weights = {fp32_name: model} | ({int8_name: quantize_int8(model)} if args.int8 else {})
    samplers = {}
    for name, weights_model in weights.items():
        samplers[name] = Sampler(weights_model, vocab, args.tokens_per_image)
        if args.device.startswith("cuda"):
            samplers[f"{name} + CUDA graphs"] = Sampler(weights_model, vocab, args.tokens_per_image,
                                                        cuda_graphs=True)
        if args.compile:
            samplers[f"{name}, compiled step"] = Sampler(weights_model, vocab, args.tokens_per_image, compile=True)
        if args.compile and args.device.startswith("cuda"):
            samplers[f"{name}, compiled step + CUDA graphs"] = Sampler(weights_model, vocab, args.tokens_per_image,
                                                                      compile=True, cuda_graphs=True)

    def hf_generate() -> int:
        with torch.inference_mode():
            out = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
        return out.shape[1] - hf_ids.shape[1]

    hf_name = "HF ChameleonForConditionalGeneration.generate"
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, text_temperature=0.0, allow_images=False)
    engines = {hf_name: hf_generate}
    engines |= {name: (lambda s=s: len(s.generate([prompt], greedy)[0])) for name, s in samplers.items()}
    compile_seconds: dict[str, float] = {}
    decode = alternate(engines, args.rounds, warm=set(engines), warm_seconds=compile_seconds)

    naive_name = "naive loop (full forward per token, no cache)"
    t2i_prompts = [random_prompt(vocab, args.prompt_len, ends_in_boi=True) for _ in range(args.batch)]
    t2i = SamplingConfig(max_new_tokens=args.tokens_per_image + 1, cfg_scale=args.cfg_scale,
                         stop_ids=(vocab.eoi_id,))

    def naive() -> int:
        out = naive_text_to_image(model, vocab, t2i_prompts, args.tokens_per_image, args.cfg_scale, seed=0)
        return len(out)

    image_engines = {naive_name: naive}
    image_engines |= {name: (lambda s=s: len(s.generate(t2i_prompts, t2i))) for name, s in samplers.items()}
    image_compile_seconds: dict[str, float] = {}
    images = alternate(image_engines, args.image_rounds, warm=set(samplers), warm_seconds=image_compile_seconds)

    where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
             f"{torch.get_num_threads()} CPU thread(s)")
    print(f"\nDecode benchmark: dim {model.cfg.dim}, {model.cfg.n_layers} layers, {model.cfg.n_heads} heads, "
          f"vocab {vocab.size}, fp32, torch {torch.__version__}, {where}, HF attention "
          f"{hf.config._attn_implementation}; medians over rounds")
    print(f"max |logit difference| HF vs chameleon-lite, same weights: {check:.2e}")
    if args.int8:
        fp32_tokens = samplers["chameleon-lite Sampler"].generate([prompt], greedy)[0]
        int8_tokens = samplers[int8_name].generate([prompt], greedy)[0]
        same = next((i for i, (a, b) in enumerate(zip(fp32_tokens, int8_tokens)) if a != b), len(fp32_tokens))
        with torch.inference_mode():
            full, quant = model(hf_ids)[0], samplers[int8_name].model(hf_ids)[0]
        rel = ((quant - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
        print(f"int8 weight-only vs fp32: greedy tokens identical for the first {same} of {len(fp32_tokens)}; "
              f"largest relative logit error over the prompt {rel:.2%}")
    fell_back = [name for name, s in samplers.items() if "compiled" in name and s._decode_call == s._feed_and_draw]
    if fell_back:
        print(f"torch.compile failed to build the step of: {', '.join(fell_back)} (logged above): those rows "
              "decoded eagerly")
    for label, seconds in (("batch-1 decode", compile_seconds), ("text -> image", image_compile_seconds)):
        firsts = ", ".join(f"{name} {t:.1f} s" for name, t in seconds.items() if "compiled" in name)
        if firsts:
            print(f"first (warm-up) call of the compiled rows, {label}, compile included: {firsts}")
    print()
    print(table(f"batch-1 greedy decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
                f"{args.rounds} rounds", "tok/s", decode, hf_name))
    print()
    print(table(f"text -> image, batch {args.batch}, CFG {args.cfg_scale} ({2 * args.batch} rows), "
                f"{args.tokens_per_image} tokens/image, {args.image_rounds} round(s)", "images/s", images,
                naive_name))


if __name__ == "__main__":
    main()
