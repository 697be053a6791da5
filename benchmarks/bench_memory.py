"""Peak training memory of ChameleonLM: gradient checkpointing on/off, packed vs padded batches.

One batch of documents (lengths drawn once from a fixed seed) goes through the training step's path
(`hidden_states` + `head_loss`, the head fused with the loss) + backward in a fresh subprocess per
variant, after one warm-up step. Two numbers, both above the process's resident set just before the
step (model, batch, libraries):

- saved activations: resident growth over the decoder's forward (before the head), i.e. what the
  blocks keep for backward; gradient checkpointing keeps only each block's input.
- peak: the resident high-water mark (VmHWM, reset before the step) over forward + backward, with
  gradients, the fused loss's chunk buffers (no full logits exist) and the one block that
  checkpointing recomputes at a time.

The child's glibc returns every freed block above 64 KiB to the OS, so its resident set follows the
live tensors.

- packed: documents concatenated into rows of `--seq-len` (the last row topped up with a padding
  document), attention kept inside documents by `doc_lens`.
- padded: one document per row, right-padded to the longest document, labels ignored on padding.

    python benchmarks/bench_memory.py                # tiny preset
    python benchmarks/bench_memory.py --quick        # seconds: smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from chameleon_lite.model import ChameleonLM, ModelConfig, head_loss

VARIANTS = {  # name: (layout, grad_checkpointing)
    "packed": ("packed", False),
    "packed + checkpointing": ("packed", True),
    "padded": ("padded", False),
    "padded + checkpointing": ("padded", True),
}


def document_lengths(n_docs: int, max_len: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(max_len // 8, max_len + 1, (n_docs,), generator=generator).tolist()


def make_batch(layout: str, lengths: list[int], seq_len: int, vocab_size: int) -> dict[str, torch.Tensor | None]:
    """input_ids, labels (B, T) and doc_lens (B, N) or None, for the documents in `lengths`."""
    ids = torch.randint(0, vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(1))
    if layout == "padded":
        width = max(lengths)
        input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        for row, doc in enumerate(ids.split(lengths)):
            input_ids[row, : len(doc)] = doc
            labels[row, : len(doc) - 1] = doc[1:]
        return {"input_ids": input_ids, "labels": labels, "doc_lens": None}
    rows = -(-sum(lengths) // seq_len)
    padding = rows * seq_len - sum(lengths)
    input_ids = torch.cat([ids, torch.zeros(padding, dtype=torch.long)]).view(rows, seq_len)
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    doc_lens: list[list[int]] = [[] for _ in range(rows)]
    position = 0
    for n in lengths + [padding]:  # a document crossing a row boundary is split in two, as packers do
        while n > 0:
            row, room = divmod(position, seq_len)
            take = min(n, seq_len - room)
            doc_lens[row].append(take)
            labels[row, room + take - 1] = -100  # no label across a document boundary
            position, n = position + take, n - take
    labels.view(-1)[sum(lengths) :] = -100
    width = max(len(r) for r in doc_lens)
    doc_lens_tensor = torch.tensor([r + [0] * (width - len(r)) for r in doc_lens])
    return {"input_ids": input_ids, "labels": labels, "doc_lens": doc_lens_tensor}


def memory_status(field: str) -> int:
    """A byte count from /proc/self/status: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current VmRSS (Linux >= 4.0)
        f.write("5")


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in the child: a warm-up step (libraries paged in), then the measured forward + backward."""
    layout, checkpointing = VARIANTS[variant]
    cfg = ModelConfig.from_preset(args.preset, vocab_size=args.vocab, grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = ChameleonLM(cfg).train()
    batch = make_batch(layout, document_lengths(args.docs, args.seq_len), args.seq_len, args.vocab)
    memory = {}

    def forward_backward() -> None:
        before = memory_status("VmRSS")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            hidden = model.hidden_states(batch["input_ids"], doc_lens=batch["doc_lens"])
            memory["saved"] = memory_status("VmRSS") - before
            loss = head_loss(hidden, model.lm_head.weight, batch["labels"]).loss
        loss.backward()
        memory["peak"] = memory_status("VmHWM") - before

    forward_backward()
    model.zero_grad(set_to_none=True)
    reset_peak_resident()
    forward_backward()
    return {
        "tokens": batch["input_ids"].numel(),
        "real_tokens": sum(document_lengths(args.docs, args.seq_len)),
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=8, help="documents in the batch")
    parser.add_argument("--seq-len", type=int, default=1024, help="packed row length = longest document")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: a few seconds")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.docs, args.seq_len = 512, 4, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    results = {}
    for variant in VARIANTS:
        command = [
            sys.executable, __file__, "--child", variant, "--preset", args.preset, "--vocab", str(args.vocab),
            "--docs", str(args.docs), "--seq-len", str(args.seq_len), "--precision", args.precision,
        ] + (["--threads", str(args.threads)] if args.threads else [])
        env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}  # RSS tracks live tensors
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])

    print(
        f"\ntraining memory above the model's resident state; preset {args.preset}, vocab "
        f"{args.vocab}, {args.docs} documents of {args.seq_len // 8}..{args.seq_len} tokens, {args.precision}\n"
    )
    print(
        "| variant | tokens (real / computed) | saved activations after forward, MB | vs no checkpointing "
        "| peak forward + backward, MB | vs no checkpointing |"
    )
    print("|---|---|---|---|---|---|")
    for variant, r in results.items():
        layout, checkpointing = VARIANTS[variant]
        reference = results[layout]  # same layout, no checkpointing
        saved_ratio, peak_ratio = (
            (f"{reference['saved'] / r['saved']:.1f}x less", f"{reference['peak'] / r['peak']:.1f}x less")
            if checkpointing
            else ("-", "-")
        )
        print(
            f"| {variant} | {r['real_tokens']:,} / {r['tokens']:,} | {r['saved'] / 2**20:,.0f} | {saved_ratio} | "
            f"{r['peak'] / 2**20:,.0f} | {peak_ratio} |"
        )


if __name__ == "__main__":
    main()
