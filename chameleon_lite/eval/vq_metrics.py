"""Image-tokenizer quality: PSNR, SSIM, codebook usage and code perplexity of encode -> decode.

* :func:`evaluate_vq` measures a tokenizer on any image source (a ``ShapesWorld`` split by default).
* :func:`photo_psnr` measures it on crops of real photographs that ship inside scikit-image
  (``skimage.data``: astronaut, coffee, chelsea) — no network.
* :func:`run_vq_eval` is what ``chameleon-eval task=vq`` calls: both of the above (and optionally a
  folder of your images), written as ``vq.json`` + ``vq.md`` into the output directory.

PSNR is the mean over images of per-image PSNR (dB, pixels in [0, 1]); SSIM is the Gaussian-window
SSIM of Wang et al. (sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03, averaged over channels and the valid
window positions), equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from chameleon_lite.vq.api import ImageTokenizer
from chameleon_lite.vq.quantizer import CodebookUsage

log = logging.getLogger(__name__)

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


def detector_agreement(original: Tensor, decoded: Tensor) -> Tensor:
    """Per image (B,) bool: the shapes-world detector reads the same objects (colour, shape, count)
    from ``decoded`` as from ``original``, both (B, 3, H, W) in [0, 1]."""
    from chameleon_lite.data.shapes import detect_objects, scene_from_detections

    def read(image: Tensor) -> Any:
        return scene_from_detections(detect_objects((image * 255).round().to(torch.uint8).cpu()))

    return torch.tensor([read(a) == read(b) for a, b in zip(original, decoded)])


@torch.inference_mode()
def evaluate_vq(tokenizer: ImageTokenizer, data: Iterable[Any], batch_size: int = 64,
                max_images: int | None = None, detector: bool = False) -> dict[str, float]:
    """Reconstruction quality and code statistics of ``tokenizer`` on ``data``.

    ``data``: a dataset of ``ShapesSample``-like items (``.image``) or images, or a loader of image
    batches / ``{"images": ...}`` dicts. Returns ``psnr``, ``psnr_min``, ``ssim`` (means over
    images), ``codebook_usage`` (fraction of the codebook hit at least once over all images),
    ``perplexity`` (exp entropy of the code histogram), ``codes_used`` and ``num_images``; with
    ``detector`` (shapes-world images) also ``detector_agreement``, the fraction of images whose
    decoded version the shapes detector reads as the same objects as the original.
    """
    usage = CodebookUsage(tokenizer.codebook_size)
    psnrs, ssims, agree = [], [], []
    for images in _image_batches(data, batch_size, max_images):
        original = tokenizer.preprocess(images)
        codes = tokenizer.encode(original)
        decoded = tokenizer.decode(codes)
        usage.update(codes)
        psnrs.append(psnr(original, decoded).cpu())
        ssims.append(ssim(original, decoded).cpu())
        if detector:
            agree.append(detector_agreement(original, decoded))
    if not psnrs:
        raise ValueError("evaluate_vq: the data yielded no images")
    all_psnr = torch.cat(psnrs)
    result = {"psnr": float(all_psnr.mean()), "psnr_min": float(all_psnr.min()), "ssim": float(torch.cat(ssims).mean()),
              "codebook_usage": usage.usage(), "perplexity": usage.perplexity(),
              "codes_used": int((usage.counts > 0).sum()), "num_images": int(all_psnr.numel())}
    if detector:
        result["detector_agreement"] = float(torch.cat(agree).float().mean())
    return result


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


def _select(cfg: Mapping[str, Any], dotted: str, default: Any) -> Any:
    """``cfg["a"]["b"]`` for ``"a.b"`` (DictConfig or plain dicts), ``default`` where missing or null."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(key) is None:
            return default
        node = node[key]
    return node


def evaluate_folder(tokenizer: ImageTokenizer, folder: str | Path | list[Path],
                    batch_size: int = 64) -> dict[str, float]:
    """:func:`evaluate_vq` on a folder of user images (or its listed files); unreadable files are skipped and
    counted (``skipped``); a folder none of whose files decodes is an error naming it."""
    from chameleon_lite.vq.data import ImageFileDataset, list_image_folder

    paths = folder if isinstance(folder, list) else list_image_folder(folder)
    dataset = ImageFileDataset(paths, tokenizer.image_size, max_pixels=tokenizer.max_pixels,
                               min_side=tokenizer.min_side)
    skipped = 0

    def good_images() -> Iterator[Tensor]:
        nonlocal skipped
        for image in dataset:
            if image is None:
                skipped += 1
            else:
                yield image

    try:
        result = evaluate_vq(tokenizer, good_images(), batch_size=batch_size)
    except ValueError as err:
        if skipped < len(paths):
            raise
        raise ValueError(f"none of the {len(paths)} image files of {paths[0].parent if paths else folder} could "
                         "be read (see the warnings above)") from err
    return {**result, "skipped": skipped}


def markdown_table(result: Mapping[str, Any]) -> str:
    """The eval result as a two-column Markdown table."""
    shapes, photos = result["shapes"], result["photos"]
    rows = [("tokenizer", f"`{result['tokenizer']}`"),
            ("images", (f"{shapes['num_images']} shapes-world {result['split']} images, "
                       f"{result['image_size']} px, {result['tokens_per_image']} tokens each")),
            ("PSNR shapes (dB)", f"{shapes['psnr']:.2f} (min {shapes['psnr_min']:.2f})"),
            ("SSIM shapes", f"{shapes['ssim']:.4f}"),
            ("codebook usage", (f"{100 * shapes['codebook_usage']:.1f}% ({shapes['codes_used']} / "
                               f"{result['codebook_size']} codes)")),
            ("code perplexity", f"{shapes['perplexity']:.1f}")]
    if "detector_agreement" in shapes:
        rows.append(("shapes detector reads the same objects", f"{100 * shapes['detector_agreement']:.1f}% of images"))
    for part, label in (("shapes_seen", "seen colour-shape pairs"), ("shapes_heldout", "held-out colour-shape pairs")):
        if part in result:
            r = result[part]
            rows.append((f"{label}: PSNR (dB) / detector reads the same objects",
                         f"{r['psnr']:.2f} / {100 * r['detector_agreement']:.1f}% of {r['num_images']} images"))
    rows += [(f"PSNR photo `{name}` (dB)", f"{value:.2f}") for name, value in photos.items() if name != "mean"]
    if photos:
        rows.append(("PSNR photos, mean (dB)", f"{photos['mean']:.2f}"))
    elif result.get("photos_skipped"):
        rows.append(("PSNR photos", f"skipped: {result['photos_skipped']}"))
    folder = result.get("folder")
    if folder:
        rows += [(f"PSNR folder `{result['folder_path']}` (dB)", (f"{folder['psnr']:.2f} over {folder['num_images']} "
                                                              f"images ({folder['skipped']} unreadable skipped)")),
                 ("SSIM folder", f"{folder['ssim']:.4f}"),
                 ("codebook usage folder", f"{100 * folder['codebook_usage']:.1f}%")]
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines) + "\n"


def run_vq_eval(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``chameleon-eval task=vq``: evaluate the tokenizer in ``tokenizer.dir``; write ``vq.json`` + ``vq.md``.

    Reads (``conf/eval.yaml``; defaults in brackets): ``tokenizer.dir`` (required), ``out_dir``
    (required), ``device`` [cpu], ``data.seed`` [0] (which shapes world), ``vq.split`` [val],
    ``vq.n_images`` [512] (with ``vq.split=test`` also reported apart for images with and without a
    held-out colour-shape pair), ``vq.batch_size`` [64], ``vq.photo_crops`` [true] (PSNR on crops of
    scikit-image's photographs; ``vq.photos`` picks them; skipped with a warning, and said in the result, where
    scikit-image is not installed), ``vq.folder`` [null] (also evaluate a
    folder of your images). Returns the metrics plus ``table`` (Markdown) and ``files``.
    """
    from chameleon_lite.config import ConfigError, resolve_path
    from chameleon_lite.data.shapes import ShapesWorld
    from chameleon_lite.eval.report import write_report

    for key in ("tokenizer.dir", "out_dir"):
        if not _select(cfg, key, None):
            raise ConfigError(f"task=vq needs config key '{key}' (e.g. {key}=tokenizers/shapes)")
    tokenizer_dir, out_dir = resolve_path(_select(cfg, "tokenizer.dir", None)), resolve_path(cfg["out_dir"])
    folder = _select(cfg, "vq.folder", None)
    if folder:  # listed first: a wrong path fails now, not after the shapes passes
        from chameleon_lite.vq.data import list_image_folder

        try:
            folder_paths = list_image_folder(resolve_path(folder))
        except (OSError, ValueError) as err:
            raise ConfigError(f"vq.folder={folder}: {str(err).split(': ', 1)[-1]}") from None
    photos = list(_select(cfg, "vq.photos", DEFAULT_PHOTOS)) if _select(cfg, "vq.photo_crops", True) else []
    photos_skipped = None
    if photos:
        try:
            import skimage.data
        except ImportError:  # an optional dependency (the dev extra): the photo line is skipped, said so
            photos_skipped = ("scikit-image is not installed (pip install scikit-image; or vq.photo_crops=false): "
                              "no photo PSNR")
            log.warning("task=vq: %s", photos_skipped)
            photos = []
        else:  # names checked now too, not after the shapes passes
            if unknown := [name for name in photos if not callable(getattr(skimage.data, str(name), None))]:
                raise ConfigError(f"vq.photos={photos}: {unknown} are not images of skimage.data (e.g. "
                                  f"{', '.join(DEFAULT_PHOTOS)}); fix vq.photos or set vq.photo_crops=false")
    tokenizer = ImageTokenizer.from_pretrained(tokenizer_dir, device=_select(cfg, "device", "cpu"))
    split, batch_size = _select(cfg, "vq.split", "val"), int(_select(cfg, "vq.batch_size", 64))
    data = ShapesWorld(seed=int(_select(cfg, "data.seed", 0)), image_size=tokenizer.image_size, split=split,
                       length=int(_select(cfg, "vq.n_images", 512)), layout=_select(cfg, "data.layout", "unambiguous"))
    samples = [data[i] for i in range(len(data))]  # rendered once: the split and (test) its held-out part
    result: dict[str, Any] = {
        "task": "vq", "tokenizer": str(tokenizer_dir), "split": split, "image_size": tokenizer.image_size,
        "tokens_per_image": tokenizer.tokens_per_image, "codebook_size": tokenizer.codebook_size,
        "shapes": evaluate_vq(tokenizer, samples, batch_size=batch_size, detector=True),
        "photos": photo_psnr(tokenizer, photos) if photos else {},
    }
    if photos_skipped:
        result["photos_skipped"] = photos_skipped
    held = [s for s in samples if s.heldout]
    if held:  # test: the held-out colour-shape pairs, which the tokenizer never saw either, on their own
        result["shapes_heldout"] = evaluate_vq(tokenizer, held, batch_size=batch_size, detector=True)
        result["shapes_seen"] = evaluate_vq(tokenizer, [s for s in samples if not s.heldout], batch_size=batch_size,
                                            detector=True)
    if folder:
        result["folder_path"] = str(resolve_path(folder))
        result["folder"] = evaluate_folder(tokenizer, folder_paths, batch_size)
    table = markdown_table(result)
    files = write_report(out_dir, "vq", result, table)
    print(table)
    return {**result, "table": table, "files": files}
