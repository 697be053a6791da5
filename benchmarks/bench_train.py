"""Training throughput of ChameleonLM against Hugging Face's ChameleonForConditionalGeneration.

One training step = forward + loss + backward + AdamW step, on random token ids. Both models get the
same shape, the same batch and the same optimiser (fused AdamW); HF computes its own shifted
cross-entropy, chameleon-lite what `chameleon-train` runs: `head_loss` (output head fused with
cross-entropy + z-loss, chunk by chunk); the "head + lm_loss" row is the unfused ablation (full logits). Runs of the two are alternated
round by round in this one process, so a noisy (shared) CPU slows both alike; the "vs HF" column is
the median over rounds of the per-round ratio; "vs HF fp32" likewise against an HF fp32 step alternated in the
same rounds (before session 14 it compared medians with the fp32 loop's HF run, minutes apart).

On a shared machine use `--threads 1 --clock cpu` (CPU seconds of this process: the scheduler's
waits do not count, and one thread does not spin on a descheduled partner). glibc returns every
block above 32 MB (logits, their gradient) to the OS on free, and re-faulting its pages costs about
as much as the op that fills it; `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295`
keeps freed memory in the process and speeds both models (the table header says whether it was set).

    python benchmarks/bench_train.py                 # reference shape + tiny preset, fp32 and bf16
    python benchmarks/bench_train.py --compile       # adds compiled decoder blocks (compile time reported)
    python benchmarks/bench_train.py --quick         # seconds: smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from chameleon_lite.model import ChameleonLM, ModelConfig, head_loss, lm_loss

HF = "HF transformers (reference)"
HF_FP32 = "HF transformers, fp32 (the vs HF fp32 reference)"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # bf16 = bf16-mixed: autocast over fp32 weights
# wall: elapsed time (a quiet machine). cpu: this process's CPU seconds, which a shared machine's
# scheduler does not inflate; with --threads 1 it measures the work itself.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def reference_config(vocab_size: int) -> ModelConfig:
    """The shape of the published reference figure: dim 256, 4 layers, 4 heads, HF's per-head QK-norm."""
    return ModelConfig(vocab_size=vocab_size, dim=256, n_layers=4, n_heads=4, qk_norm_per_head=True)


def hf_twin(cfg: ModelConfig) -> nn.Module:
    """HF's Chameleon at the same shape (SDPA attention, no image-token logit masking)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    hf_cfg = ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        swin_norm=cfg.swin_norm, tie_word_embeddings=cfg.tie_embeddings, vocabulary_map={},
        attn_implementation="sdpa",
    )
    return ChameleonForConditionalGeneration(hf_cfg).train()


def training_step(
    model: nn.Module, is_hf: bool, ids: torch.Tensor, doc_lens: torch.Tensor | None, precision: str,
    fused_head: bool = True, optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """A closure running one optimiser step; the language-model parameters only (not HF's VQ-VAE).
    `fused_head=False`: chameleon-lite's full logits + `lm_loss` instead of `head_loss`. `optimizer`: over
    `model`'s parameters (default: fused AdamW)."""
    params = [p for name, p in model.named_parameters() if not name.startswith("model.vqmodel")]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-4, fused=True)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    dtype = PRECISIONS[precision]

    def step() -> None:
        with torch.autocast(ids.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if is_hf:
                loss = model(input_ids=ids, labels=ids).loss
            elif fused_head:
                loss = head_loss(model.hidden_states(ids, doc_lens=doc_lens), model.lm_head.weight, labels).loss
            else:
                loss = lm_loss(model(ids, doc_lens=doc_lens), labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize() -> None:
    """Wait for queued CUDA work (a no-op on CPU), so a clock read after it counts the work."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds_per_step(step: Callable[[], None], steps: int, clock: Callable[[], float]) -> float:
    synchronize()
    start = clock()
    for _ in range(steps):
        step()
    synchronize()
    return (clock() - start) / steps


def bench_shape(name: str, cfg: ModelConfig, args: argparse.Namespace) -> list[list[str]]:
    """Rows of the table for one model shape, every precision, every variant alternated per round."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=generator)
    n_docs = 4  # packed variant: each row holds 4 equal documents, no attention across them
    doc_lens = torch.full((args.batch, n_docs), args.seq_len // n_docs)
    doc_lens[:, -1] += args.seq_len - doc_lens.sum(1)
    tokens = args.batch * args.seq_len
    rows = []
    for precision in args.precision.split(","):
        torch.manual_seed(0)
        variants: dict[str, Callable[[], None]] = {
            HF: training_step(hf_twin(cfg), True, ids, None, precision),
            "chameleon-lite": training_step(ChameleonLM(cfg).train(), False, ids, None, precision),
            f"chameleon-lite, packed {n_docs} docs/row": training_step(
                ChameleonLM(cfg).train(), False, ids, doc_lens, precision
            ),
            "chameleon-lite, head + lm_loss (unfused)": training_step(
                ChameleonLM(cfg).train(), False, ids, None, precision, fused_head=False
            ),
        }
        if precision != "fp32":  # the "vs HF fp32" column's reference, alternated in the same rounds (drift cancels)
            variants[HF_FP32] = training_step(hf_twin(cfg), True, ids, None, "fp32")
        notes = {name: "" for name in variants}
        if args.compile:  # what `chameleon-train compile=true` does: each decoder block compiled
            label = "chameleon-lite, compiled blocks"
            compiled = ChameleonLM(cfg).train()
            compiled.compile_blocks()
            variants[label] = training_step(compiled, False, ids, None, precision)
            start = time.perf_counter()
            variants[label]()
            notes[label] = f"compile + first step {time.perf_counter() - start:.0f} s wall"
        for step in variants.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for variant, step in variants.items():
                times[variant].append(seconds_per_step(step, args.steps, CLOCKS[args.clock]))
        reference = times.pop(HF_FP32, times[HF] if precision == "fp32" else None)
        for variant, seconds in times.items():
            ratio = statistics.median(r / s for r, s in zip(times[HF], seconds))
            vs_fp32 = "-" if reference is None else \
                f"{statistics.median(r / s for r, s in zip(reference, seconds)):.2f}x"
            rows.append([
                name, precision, variant, f"{tokens / min(seconds):,.0f}",
                f"{tokens / statistics.median(seconds):,.0f}", f"{ratio:.2f}x", vs_fp32, notes[variant],
            ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="reference,tiny", help="comma list: reference, or any preset name")
    parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timed runs per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--compile", action="store_true", help="also time compiled decoder blocks (compile=true)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batch, args.seq_len, args.vocab = "tiny", 2, 64, 512
        args.steps, args.rounds, args.warmup = 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rows = []
    for shape in args.shapes.split(","):
        if shape == "reference":
            cfg = reference_config(args.vocab)
        else:
            cfg = ModelConfig.from_preset(shape, vocab_size=args.vocab)
        rows += bench_shape(shape, cfg, args)

    print(
        f"\ntraining tokens/s, batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
        f"{args.clock} clock; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}\n"
    )
    header = [
        "shape", "precision", "variant", "tok/s (best round)", "tok/s (median)", "vs HF (same precision)",
        "vs HF fp32", "note",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
