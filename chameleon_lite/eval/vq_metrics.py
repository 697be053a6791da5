"""Image-tokenizer quality: PSNR, SSIM, codebook usage and code perplexity of encode -> decode.

* :func:`evaluate_vq` measures a tokenizer on any image source (a ``ShapesWorld`` split by default).
* :func:`photo_psnr` measures it on crops of real photographs that ship inside scikit-image
  (``skimage.data``: astronaut, coffee, chelsea) — no network.
* :func:`run_vq_eval` is what ``chameleon-eval task=vq`` calls: both of the above, written as
  ``vq_metrics.json`` + ``vq_metrics.md`` into an output directory.

PSNR is the mean over images of per-image PSNR (dB, pixels in [0, 1]); SSIM is the Gaussian-window
SSIM of Wang et al. (sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, averaged over channels and the valid
window positions), equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from chameleon_lite.files import atomic_write_text
from chameleon_lite.vq.api import ImageTokenizer
from chameleon_lite.vq.quantizer import CodebookUsage

DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea")


def psnr(reference: Tensor, estimate: Tensor) -> Tensor:
    """Per-image PSNR (B,) in dB of (B, C, H, W) images in [0, 1]; identical images give 100 dB."""
    mse = (reference.float() - estimate.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def ssim(reference: Tensor, estimate: Tensor, sigma: float = 1.5, radius: int = 5) -> Tensor:
    """Per-image SSIM (B,) of (B, C, H, W) images in [0, 1] (Gaussian window, valid positions only)."""
    x, y = reference.float(), estimate.float()
    channels = x.shape[1]
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, -1, -1)  # (C, 1, k, k), depthwise

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def _image_batches(data: Iterable[Any], batch_size: int, max_images: int | None) -> Iterator[list[Any]]:
    """Group a dataset's items (or a loader's batches) into lists of single images."""
    batch: list[Any] = []
    seen = 0
    for item in data:
        images = item.image if hasattr(item, "image") else item["images"] if isinstance(item, Mapping) else item
        singles = list(images) if isinstance(images, Tensor) and images.ndim == 4 else [images]
        for image in singles:
            if max_images is not None and seen >= max_images:
                break
            batch.append(image)
            seen += 1
            if len(batch) == batch_size:
                yield batch
                batch = []
        if max_images is not None and seen >= max_images:
            break
    if batch:
        yield batch


@torch.inference_mode()
def evaluate_vq(tokenizer: ImageTokenizer, data: Iterable[Any], batch_size: int = 64,
                max_images: int | None = None) -> dict[str, float]:
    """Reconstruction quality and code statistics of ``tokenizer`` on ``data``.

    ``data``: a dataset of ``ShapesSample``-like items (``.image``) or images, or a loader of image
    batches / ``{"images": ...}`` dicts. Returns ``psnr``, ``psnr_min``, ``ssim`` (means over
    images), ``codebook_usage`` (fraction of the codebook hit at least once over all images),
    ``perplexity`` (exp entropy of the code histogram), ``codes_used`` and ``num_images``.
    """
    usage = CodebookUsage(tokenizer.codebook_size)
    psnrs, ssims = [], []
    for images in _image_batches(data, batch_size, max_images):
        original = tokenizer.preprocess(images)
        codes = tokenizer.encode(original)
        decoded = tokenizer.decode(codes)
        usage.update(codes)
        psnrs.append(psnr(original, decoded).cpu())
        ssims.append(ssim(original, decoded).cpu())
    if not psnrs:
        raise ValueError("evaluate_vq: the data yielded no images")
    all_psnr = torch.cat(psnrs)
    return {"psnr": float(all_psnr.mean()), "psnr_min": float(all_psnr.min()), "ssim": float(torch.cat(ssims).mean()),
            "codebook_usage": usage.usage(), "perplexity": usage.perplexity(),
            "codes_used": int((usage.counts > 0).sum()), "num_images": int(all_psnr.numel())}


def photo_crops(photo: Tensor, side: int, per_side: int) -> list[Tensor]:
    """Up to ``per_side**2`` distinct ``side x side`` crops of a (3, H, W) photo on an evenly spaced grid."""
    h, w = photo.shape[-2:]
    side = min(side, h, w)
    ys = torch.linspace(0, h - side, per_side).round().long().unique().tolist()
    xs = torch.linspace(0, w - side, per_side).round().long().unique().tolist()
    return [photo[:, y:y + side, x:x + side] for y in ys for x in xs]


def photo_psnr(tokenizer: ImageTokenizer, names: Sequence[str] = DEFAULT_PHOTOS, per_side: int = 2) -> dict[str, float]:
    """PSNR (dB) per photo of ``skimage.data`` (and their ``mean``) over crops of ``image_size`` pixels.

    Crops are taken at native resolution (no resampling unless the photo is smaller than the
    tokenizer's ``image_size``), so the number measures the tokenizer, not a resize.
    """
    import skimage.data

    results: dict[str, float] = {}
    for name in names:
        array = getattr(skimage.data, name)()
        photo = torch.from_numpy(array.copy())
        photo = photo.permute(2, 0, 1) if photo.ndim == 3 else photo.unsqueeze(0)  # (C, H, W) uint8
        crops = photo_crops(photo, tokenizer.image_size, per_side)
        original = tokenizer.preprocess(crops)
        decoded = tokenizer.decode(tokenizer.encode(original))
        results[name] = float(psnr(original, decoded).mean())
    results["mean"] = sum(results.values()) / len(names)
    return results


def markdown_table(result: Mapping[str, Any]) -> str:
    """The eval result as a two-column Markdown table."""
    shapes, photos = result["shapes"], result["photos"]
    rows = [("tokenizer", f"`{result['tokenizer']}`"),
            ("images", f"{shapes['num_images']} shapes-world {result['split']} images, "
                       f"{result['image_size']} px, {result['tokens_per_image']} tokens each"),
            ("PSNR shapes (dB)", f"{shapes['psnr']:.2f} (min {shapes['psnr_min']:.2f})"),
            ("SSIM shapes", f"{shapes['ssim']:.4f}"),
            ("codebook usage", f"{100 * shapes['codebook_usage']:.1f}% ({shapes['codes_used']} / "
                               f"{result['codebook_size']} codes)"),
            ("code perplexity", f"{shapes['perplexity']:.1f}")]
    rows += [(f"PSNR photo `{name}` (dB)", f"{value:.2f}") for name, value in photos.items() if name != "mean"]
    if photos:
        rows.append(("PSNR photos, mean (dB)", f"{photos['mean']:.2f}"))
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def run_vq_eval(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the tokenizer in ``cfg["tokenizer_dir"]``; write ``vq_metrics.{json,md}`` into ``cfg["out_dir"]``.

    Keys (defaults): ``tokenizer_dir`` (required), ``out_dir`` (required), ``split`` ("val"),
    ``num_images`` (1000), ``seed`` (0), ``batch_size`` (64), ``photos`` (astronaut, coffee,
    chelsea; empty to skip), ``photo_crops_per_side`` (2). Returns the metrics plus ``table``
    (Markdown) and ``files``.
    """
    from chameleon_lite.config import resolve_path
    from chameleon_lite.data.shapes import ShapesWorld

    for key in ("tokenizer_dir", "out_dir"):
        if not cfg.get(key):
            raise ValueError(f"vq eval: config key '{key}' is required (e.g. {key}=tokenizers/shapes)")
    tokenizer_dir, out_dir = resolve_path(cfg["tokenizer_dir"]), resolve_path(cfg["out_dir"])
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir)
    split = cfg.get("split", "val")
    data = ShapesWorld(seed=int(cfg.get("seed", 0)), image_size=tokenizer.image_size, split=split,
                       length=int(cfg.get("num_images", 1000)))
    photos = list(cfg.get("photos", DEFAULT_PHOTOS) or [])
    result: dict[str, Any] = {
        "tokenizer": str(tokenizer_dir), "split": split, "image_size": tokenizer.image_size,
        "tokens_per_image": tokenizer.tokens_per_image, "codebook_size": tokenizer.codebook_size,
        "shapes": evaluate_vq(tokenizer, data, batch_size=int(cfg.get("batch_size", 64))),
        "photos": photo_psnr(tokenizer, photos, int(cfg.get("photo_crops_per_side", 2))) if photos else {},
    }
    table = markdown_table(result)
    json_path, md_path = out_dir / "vq_metrics.json", out_dir / "vq_metrics.md"
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write_text(md_path, table)
    return {**result, "table": table, "files": [str(json_path), str(md_path)]}
