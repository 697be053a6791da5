"""Model FLOPs utilisation of ChameleonLM training against this machine's measured matmul peak.

MFU = `ChameleonLM.flops_per_token(seq_len)` x training tokens/s / peak, where the peak is the best
rate of a large square matmul in the same precision, measured by this script in this run (before
and after the training runs, best of both), with the same threads and clock. A training step is
forward + `head_loss` + backward + fused AdamW (as in bench_train.py and `chameleon-train`).

    python benchmarks/bench_mfu.py                   # tiny and small presets, fp32 and bf16
    python benchmarks/bench_mfu.py --compile         # adds compiled decoder blocks (chameleon-train compile=true)
    python benchmarks/bench_mfu.py --quick           # seconds: smoke run
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_train import CLOCKS, PRECISIONS, reference_config, seconds_per_step, training_step

from chameleon_lite.model import ChameleonLM, ModelConfig


def matmul_peak(size: int, precision: str, repeats: int, clock) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul over `repeats` timed calls."""
    dtype = PRECISIONS[precision] or torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,small", help="comma list: reference, or any preset name")
    parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per shape; the best counts")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square peak matmul")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--compile", action="store_true", help="also measure compiled decoder blocks (compile=true)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batch, args.seq_len, args.vocab = "tiny", 2, 64, 512
        args.steps, args.rounds, args.peak_size = 1, 1, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    precisions = args.precision.split(",")

    peaks = {p: matmul_peak(args.peak_size, p, 5, clock) for p in precisions}
    tokens = args.batch * args.seq_len
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for shape in args.shapes.split(","):
        cfg = reference_config(args.vocab) if shape == "reference" else ModelConfig.from_preset(shape, vocab_size=args.vocab)
        for precision in precisions:
            for compiled in (False, True) if args.compile else (False,):
                torch.manual_seed(0)
                model = ChameleonLM(cfg).train()
                if compiled:
                    model.compile_blocks()
                step = training_step(model, False, ids, None, precision)
                step()
                seconds = min(seconds_per_step(step, args.steps, clock) for _ in range(args.rounds))
                rows.append((shape, precision, "compiled" if compiled else "eager", model, tokens / seconds))
    peaks = {p: max(peaks[p], matmul_peak(args.peak_size, p, 5, clock)) for p in precisions}

    print(
        f"\nMFU, batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; load average {os.getloadavg()[0]:.1f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}\n"
    )
    print("| precision | matmul peak, GFLOP/s (measured) |\n|---|---|")
    for precision, peak in peaks.items():
        print(f"| {precision} | {peak / 1e9:,.0f} |")
    print("\n| shape | precision | blocks | params excl. embedding table | model FLOPs/token | tok/s | achieved GFLOP/s "
          "| MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, precision, blocks, model, tok_per_s in rows:
        flops = model.flops_per_token(args.seq_len)
        achieved = flops * tok_per_s
        print(
            f"| {shape} | {precision} | {blocks} | {model.num_params(exclude_embeddings=True) / 1e6:.1f}M | "
            f"{flops / 1e6:.1f}M | {tok_per_s:,.0f} | {achieved / 1e9:,.1f} | {achieved / peaks[precision]:.0%} |"
        )


if __name__ == "__main__":
    main()
