"""Real-token fraction of packed rows vs pad-to-longest batching, on the default shapes data.

    python benchmarks/bench_packing.py [--docs 20000] [--seq-len 1024] [--batch 4]

Documents are the default recipe's (T2I + captioning, shapes captions through the shipped text
tokenizer, 64 image tokens each). Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from chameleon_lite.config import TOKENIZERS_DIR
from chameleon_lite.data.datamodule import cache_documents
from chameleon_lite.data.packing import PackingStats, pack_documents
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.data.token_cache import TokenCache
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="documents per batch for pad-to-longest")
    p.add_argument("--tokens-per-image", type=int, default=64)
    args = p.parse_args()

    tok = MultimodalTokenizer.from_dir(TOKENIZERS_DIR / "shapes", load_image=False)
    world = ShapesWorld(seed=0, split="train", length=args.docs)
    texts = [world[i].caption for i in range(args.docs)]
    # image codes do not change lengths: zeros stand in for the VQ's codes
    cache = TokenCache(torch.zeros(args.docs, args.tokens_per_image, dtype=torch.long), texts, [{}] * args.docs)
    docs = cache_documents(cache, tok.builder(), {"t2i": 0.5, "caption": 0.5}, seed=0, epoch=0)
    lengths = np.array([len(d) for d in docs])

    rows = []
    for name, lookahead in (("greedy packing", 1), ("best-fit packing (default)", 64)):
        stats = PackingStats()
        t = time.perf_counter()
        list(pack_documents(docs, args.seq_len, tok.vocab.pad_id, lookahead=lookahead, stats=stats))
        rows.append((name, stats.real_fraction, stats.rows, time.perf_counter() - t))
    padded = sum(int(lengths[i:i + args.batch].max()) * len(lengths[i:i + args.batch])
                 for i in range(0, len(lengths), args.batch))
    rows.append((f"pad to longest (batch {args.batch} docs)", lengths.sum() / padded, -(-len(docs) // args.batch), 0.0))

    print(f"{args.docs} documents, length {lengths.min()}-{lengths.max()} (mean {lengths.mean():.1f}), "
          f"seq_len {args.seq_len}\n")
    print("| batching | real tokens | rows / batches | pack time (s) | vs pad-to-longest |")
    print("|---|---|---|---|---|")
    ref = rows[-1][1]
    for name, frac, n, dt in rows:
        print(f"| {name} | {100 * frac:.2f}% | {n} | {dt:.2f} | {frac / ref:.3f}x |")


if __name__ == "__main__":
    main()
