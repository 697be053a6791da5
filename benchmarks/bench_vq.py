"""Image-tokenizer speed: chameleon-lite's encode and decode, against HF transformers' ChameleonVQVAE encoder.

HF's ``ChameleonVQVAE`` is built from a ``ChameleonVQVAEConfig`` with the same channels, multipliers,
resolution, latent/embedding sizes and codebook, and loaded with *our* weights (the encoder half is
key-compatible), so both encoders do the same work; whether they also return the same codes is
printed as a check (it needs Euclidean lookup: with ``l2_normalize`` our codes differ by design).
HF has no VQ decoder, so decode is reported without a reference.

Runs are alternated round by round in this one process, so a noisy (shared) CPU slows both alike;
each row reports the median over rounds; the ratio is the median of per-round ratios, by wall clock
and by this process's CPU time. Never asserted anywhere: this prints a Markdown table.

    python benchmarks/bench_vq.py --preset chameleon_512 --batch 1 --rounds 3   # Chameleon's shape vs HF
    python benchmarks/bench_vq.py --tokenizer tokenizers/shapes                 # the shipped weights
    python benchmarks/bench_vq.py --preset shapes --set norm_groups=16 --set base_channels=32

HF's encoder hard-codes GroupNorm(32 groups): for a configuration it cannot express (e.g. the
shipped shapes tokenizer, norm_groups=8) only chameleon-lite's rows are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import yaml

from chameleon_lite.config import CONF_DIR
from chameleon_lite.vq import ImageTokenizer, VQConfig
from chameleon_lite.vq.model import VQModel


def hf_reference(model: VQModel) -> torch.nn.Module | None:
    """HF ``ChameleonVQVAE`` at ``model``'s configuration carrying ``model``'s encoder-side weights, or None
    when HF cannot express the configuration (it hard-codes GroupNorm with 32 groups)."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    c = model.config
    if c.norm_groups != 32:
        return None
    hf_config = ChameleonVQVAEConfig(
        embed_dim=c.embed_dim, num_embeddings=c.codebook_size, latent_channels=c.latent_channels,
        resolution=c.image_size, in_channels=c.in_channels, base_channels=c.base_channels,
        channel_multiplier=list(c.channel_multipliers), num_res_blocks=c.num_res_blocks, attn_resolutions=None,
        dropout=c.dropout, attn_type="vanilla" if c.mid_attention else "none")
    hf = ChameleonVQVAE(hf_config).eval()
    encoder_side = {k: v for k, v in model.export_state_dict().items() if not k.startswith("decoder.")}
    result = hf.load_state_dict(encoder_side, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"HF weights do not line up: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return hf


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; on a GPU the queued kernels are waited for on both
    sides (CUDA calls return before their work is done; CPU seconds then count only the launching)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def rate(images_per_s: float) -> str:
    return f"{images_per_s:.1f}" if images_per_s >= 10 else f"{images_per_s:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="chameleon_512", help="conf/vq/<preset>.yaml (default: chameleon_512)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset's model key (YAML value), e.g. --set norm_groups=32")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (vq.yaml + vq.safetensors)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.tokenizer:
        tok = ImageTokenizer.from_pretrained(args.tokenizer, device=args.device)
        source = args.tokenizer
    else:
        values = yaml.safe_load((CONF_DIR / "vq" / f"{args.preset}.yaml").read_text())["model"]
        for item in args.set:
            key, _, value = item.partition("=")
            values[key] = yaml.safe_load(value)
        tok = ImageTokenizer(VQModel(VQConfig.from_dict(values)), device=args.device)
        source = f"preset {args.preset}{' ' + ' '.join(args.set) if args.set else ''}, random weights"
    model, c = tok.model, tok.config
    hf = hf_reference(model)
    if hf is not None:
        hf.to(args.device)
    pixels = torch.rand(args.batch, 3, c.image_size, c.image_size, device=args.device) * 2 - 1

    with torch.inference_mode():
        ours_codes = model.encode(pixels).indices
        runs: dict[str, Callable[[], object]] = {"chameleon-lite encode": lambda: model.encode(pixels).indices}
        if hf is None:
            same = f"n/a (HF's ChameleonVQVAE hard-codes GroupNorm(32); this config has norm_groups={c.norm_groups})"
        else:
            hf_codes = hf.encode(pixels).image_tokens.view_as(ours_codes)
            same = "n/a (l2_normalize: cosine lookup)" if c.l2_normalize else (
                "yes" if torch.equal(ours_codes, hf_codes) else f"{(ours_codes == hf_codes).float().mean():.1%} equal")
            runs["HF ChameleonVQVAE encode"] = lambda: hf.encode(pixels).image_tokens
        runs["chameleon-lite decode"] = lambda: model.decode_indices(ours_codes)
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn))

    ref = times.get("HF ChameleonVQVAE encode")
    print(f"\nVQ {source}: {c.image_size} px -> {c.grid_size}x{c.grid_size} codes of {c.codebook_size}; "
          f"batch {args.batch}, {args.rounds} rounds, device {args.device}, torch threads {torch.get_num_threads()}; "
          f"same codes as HF: {same}\n")
    print("| run | images/s (wall) | images/s (CPU time) | encode speed vs HF (wall) | vs HF (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in times.items():
        wall = statistics.median(args.batch / w for w, _ in samples)
        cpu = statistics.median(args.batch / max(p, 1e-9) for _, p in samples)
        if "encode" in name and ref is not None:
            ratio_wall = statistics.median(rw / w for (w, _), (rw, _) in zip(samples, ref))
            ratio_cpu = statistics.median(rp / max(p, 1e-9) for (_, p), (_, rp) in zip(samples, ref))
            ratios = f"{ratio_wall:.2f}x | {ratio_cpu:.2f}x"
        else:
            ratios = "n/a (HF has no VQ decoder) | n/a" if "decode" in name else "n/a | n/a"
        print(f"| {name} | {rate(wall)} | {rate(cpu)} | {ratios} |")


if __name__ == "__main__":
    main()
