"""Model FLOPs utilisation of ChameleonLM training against this machine's measured matmul peak.

MFU = `ChameleonLM.flops_per_token(seq_len)` x training tokens/s / peak, where the peak is the best
rate of a large square matmul in the same precision, measured by this script in this run (before
and after the training runs, best of both), with the same threads and clock. A training step is
forward + `head_loss` + backward + an optimizer step: fused AdamW (as in bench_train.py), or with
``--optim adamw,muon`` the optimizers ``chameleon-train optim=adamw|muon`` builds, with their conf/optim settings.

    python benchmarks/bench_mfu.py                   # tiny and small presets, fp32 and bf16
    python benchmarks/bench_mfu.py --compile         # adds compiled decoder blocks (chameleon-train compile=true)
    python benchmarks/bench_mfu.py --quick           # seconds: smoke run
    python benchmarks/bench_mfu.py --device cuda --precision bf16 --shapes small,base --seq-len 2048 \
        --attn sdpa,xformers --docs 4                # a GPU: packed rows, both attention backends
    python benchmarks/bench_mfu.py --shapes tiny,384x4,256x8,384x6,512x4,512x6,small --precision bf16 \
        --batch 12 --seq-len 352 --vocab 896        # the shapes recipe's step at other model shapes
    python benchmarks/bench_mfu.py --shapes tiny,small --precision bf16 --batch 12 --seq-len 352 --vocab 896 \
        --optim adamw,muon                           # the recipe's step with AdamW and with Muon
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re

import torch
from bench_train import CLOCKS, PRECISIONS, reference_config, seconds_per_step, synchronize, training_step

from chameleon_lite.model import ChameleonLM, ModelConfig


def matmul_peak(size: int, precision: str, repeats: int, clock, device: str = "cpu") -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul over `repeats` timed calls."""
    dtype = PRECISIONS[precision] or torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = clock()
        a @ b
        synchronize()
        best = min(best, clock() - start)
    return 2 * size**3 / best


def shape_config(shape: str, vocab: int) -> ModelConfig:
    """``reference``, a preset name, or ``DIMxLAYERS`` (e.g. ``384x6``: heads of 64 dims, as the presets)."""
    if shape == "reference":
        return reference_config(vocab)
    if match := re.fullmatch(r"(\d+)x(\d+)", shape):
        dim, layers = int(match[1]), int(match[2])
        return ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=max(1, dim // 64))
    return ModelConfig.from_preset(shape, vocab_size=vocab)


#: ``--optim`` choices: the bench's own fused AdamW, or a training optimizer with its ``conf/optim`` settings
#: (`chameleon_lite.train.optim.build_optimizer`: what ``chameleon-train optim=NAME`` steps).
OPTIMIZERS = {"fused-adamw": "fused AdamW", "adamw": "optim=adamw", "muon": "optim=muon"}


def make_optimizer(name: str, model: ChameleonLM) -> torch.optim.Optimizer | None:
    """``--optim`` NAME over ``model`` (None: `training_step`'s default, fused AdamW)."""
    if name == "fused-adamw":
        return None
    from omegaconf import OmegaConf

    from chameleon_lite.config import compose_config
    from chameleon_lite.train.optim import build_optimizer

    return build_optimizer(model, OmegaConf.to_container(compose_config("train", [f"optim={name}"]).optim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,small",
                        help="comma list: reference, any preset name, or DIMxLAYERS (e.g. 384x6)")
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attn", default="sdpa", help="comma list of attention backends: sdpa, xformers (CUDA)")
    parser.add_argument("--docs", type=int, default=1, help="documents packed per row (doc_lens; 1: plain causal)")
    parser.add_argument("--optim", default="fused-adamw",
                        help=f"comma list of {', '.join(OPTIMIZERS)} (adamw, muon: the training's, conf/optim)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: a few seconds")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batch, args.seq_len, args.vocab = "tiny", 2, 64, 512
        args.steps, args.rounds, args.peak_size = 1, 1, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    precisions = args.precision.split(",")

    peaks = {p: matmul_peak(args.peak_size, p, 5, clock, args.device) for p in precisions}
    tokens = args.batch * args.seq_len
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    doc_lens = None
    if args.docs > 1:  # each row holds `docs` equal documents, no attention across them
        doc_lens = torch.full((args.batch, args.docs), args.seq_len // args.docs)
        doc_lens[:, -1] += args.seq_len - doc_lens.sum(1)
        doc_lens = doc_lens.to(args.device)
    rows = []
    for shape in args.shapes.split(","):
        cfg = shape_config(shape, args.vocab)
        for optim, attn, precision, compiled in itertools.product(
                args.optim.split(","), args.attn.split(","), precisions, (False, True) if args.compile else (False,)):
            torch.manual_seed(0)
            model = ChameleonLM(dataclasses.replace(cfg, attn_impl=attn)).to(args.device).train()
            if compiled:
                model.compile_blocks()
            step = training_step(model, False, ids, doc_lens, precision, optimizer=make_optimizer(optim, model))
            step()
            seconds = min(seconds_per_step(step, args.steps, clock) for _ in range(args.rounds))
            rows.append((shape, OPTIMIZERS[optim], attn, precision, "compiled" if compiled else "eager", model,
                         tokens / seconds))
            del model, step
    peaks = {p: max(peaks[p], matmul_peak(args.peak_size, p, 5, clock, args.device)) for p in precisions}

    where = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
             f"{torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}")
    print(
        f"\nMFU, batch {args.batch} x {args.seq_len} tokens, {args.docs} document(s) per row, vocab {args.vocab}; "
        f"torch {torch.__version__}, {where}, {args.clock} clock; load average {os.getloadavg()[0]:.1f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}\n"
    )
    print(f"| precision | matmul peak, GFLOP/s (measured, {args.peak_size}^3) |\n|---|---|")
    for precision, peak in peaks.items():
        print(f"| {precision} | {peak / 1e9:,.0f} |")
    print("\n| shape | optimizer | attention | precision | blocks | params excl. embedding table | model FLOPs/token "
          "| tok/s | ms/step | achieved GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, optim, attn, precision, blocks, model, tok_per_s in rows:
        flops = model.flops_per_token(args.seq_len)
        achieved = flops * tok_per_s
        print(
            f"| {shape} | {optim} | {attn} | {precision} | {blocks} | {model.num_params(exclude_embeddings=True) / 1e6:.1f}M | "
            f"{flops / 1e6:.1f}M | {tok_per_s:,.0f} | {1000 * tokens / tok_per_s:,.1f} | {achieved / 1e9:,.1f} | "
            f"{achieved / peaks[precision]:.0%} |"
        )


if __name__ == "__main__":
    main()
