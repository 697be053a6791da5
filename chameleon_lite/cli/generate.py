"""`chameleon-generate`: text->image, captioning, text completion or interleaved output from a checkpoint."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig, ListConfig, OmegaConf

from chameleon_lite.config import CONF_DIR, ConfigError, hydra_app, resolve_path
from chameleon_lite.generation.api import Generator
from chameleon_lite.viz import save_captioned_grid

log = logging.getLogger(__name__)
#: The options of conf/generate.yaml each task reads (the others apply to every task: ckpt, seed, device, ...).
TASK_OPTIONS = {
    "t2i": ("prompt", "n", "cfg_scale", "image_temperature", "image_top_k", "image_top_p", "image_candidates",
            "negative_prompt", "negative_scale"),
    "caption": ("image", "text_temperature", "caption_cfg_scale", "caption_candidates",
                "caption_candidate_temperature"),
    "text": ("prompt", "text_temperature", "text_top_k", "text_top_p", "max_new_tokens"),
    "interleaved": ("prompt", "cfg_scale", "image_temperature", "image_top_k", "image_top_p", "text_temperature",
                    "text_top_k", "text_top_p", "max_new_tokens"),
}
TASKS = tuple(TASK_OPTIONS)
TEXT_MAX_NEW_TOKENS = 64  # task=text with max_new_tokens=null


def as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, ListConfig)) else [str(value)]


def checked_inputs(cfg: DictConfig) -> tuple[list[str], list[str], list]:
    """The task's prompts, negative prompts and image paths, checked before the model loads (a large model
    or ``compile=true`` would otherwise make a typo cost the load)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is invalid: use one of {', '.join(TASKS)}")
    prompts, negatives, paths = as_list(cfg.prompt), as_list(cfg.negative_prompt), []
    if cfg.task == "caption":
        paths = [resolve_path(p) for p in as_list(cfg.image)]
        if not paths:
            raise ConfigError("task=caption needs image=path.png (or a list of paths)")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"image: no such file(s): {', '.join(missing)}")
    elif not prompts:
        raise ConfigError(f"task={cfg.task} needs prompt=\"...\" (or a list)")
    if cfg.task == "t2i" and negatives:
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ConfigError(f"negative_prompt has {len(negatives)} texts for {len(prompts)} prompts: give one "
                              "text (for every prompt) or one per prompt")
        if cfg.cfg_scale is None:
            raise ConfigError("negative_prompt adds to classifier-free guidance: set cfg_scale (e.g. 2.0)")
    return prompts, negatives, paths


def warn_unused_options(cfg: DictConfig) -> None:
    """Log a warning for each task option that ``cfg.task`` does not read but that is set away from its
    conf/generate.yaml default (it would be ignored silently)."""
    defaults = OmegaConf.load(CONF_DIR / "generate.yaml")
    for key in sorted({k for keys in TASK_OPTIONS.values() for k in keys} - set(TASK_OPTIONS[cfg.task])):
        if cfg[key] != defaults[key]:
            users = " / ".join(task for task, keys in TASK_OPTIONS.items() if key in keys)
            log.warning("%s=%s is not used by task=%s (only by task=%s): ignored", key, cfg[key], cfg.task, users)


def generate(cfg: DictConfig) -> dict:
    """Run one generation task and write its PNG grid and JSON side-car into ``cfg.out_dir``."""
    prompts, negatives, paths = checked_inputs(cfg)
    warn_unused_options(cfg)
    out_dir = resolve_path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = Generator.load(resolve_path(cfg.ckpt), cfg.tokenizer_dir, device=cfg.device, quantize=cfg.quantize,
                         compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)
    record: dict = {"task": cfg.task, "ckpt": str(cfg.ckpt), "seed": cfg.seed}
    if cfg.task == "t2i":
        if negatives:
            record["negative_prompts"] = negatives
        images = gen.generate_images(prompts, n=cfg.n, cfg_scale=cfg.cfg_scale, temperature=cfg.image_temperature,
                                     top_k=cfg.image_top_k, top_p=cfg.image_top_p, seed=cfg.seed,
                                     candidates=cfg.image_candidates, negative_prompts=negatives or None,
                                     negative_scale=cfg.negative_scale)
        titles = [p for p in prompts for _ in range(cfg.n)]
        record["images"] = str(save_captioned_grid(images, titles, out_dir / "t2i.png", nrow=cfg.n))
        record["prompts"] = prompts
    elif cfg.task == "caption":
        captions = gen.caption([str(p) for p in paths], temperature=cfg.text_temperature, seed=cfg.seed,
                               cfg_scale=cfg.caption_cfg_scale, candidates=cfg.caption_candidates,
                               candidate_temperature=cfg.caption_candidate_temperature)
        images = gen.tok.image.preprocess([str(p) for p in paths])
        record["captions"] = {str(p): c for p, c in zip(paths, captions)}
        record["images"] = str(save_captioned_grid(images, captions, out_dir / "captions.png"))
    elif cfg.task == "text":
        budget = TEXT_MAX_NEW_TOKENS if cfg.max_new_tokens is None else cfg.max_new_tokens
        record["completions"] = {p: gen.complete(p, max_new_tokens=budget, temperature=cfg.text_temperature,
                                                 top_k=cfg.text_top_k, top_p=cfg.text_top_p, seed=cfg.seed)
                                 for p in prompts}
    else:
        outputs = []
        for k, p in enumerate(prompts):
            segments = gen.interleaved(p, max_new_tokens=cfg.max_new_tokens, text_temperature=cfg.text_temperature,
                                       text_top_k=cfg.text_top_k, text_top_p=cfg.text_top_p,
                                       image_temperature=cfg.image_temperature, image_top_k=cfg.image_top_k,
                                       image_top_p=cfg.image_top_p, cfg_scale=cfg.cfg_scale, seed=cfg.seed)
            images = [s.image for s in segments if s.kind == "image"]
            texts = [s.text for s in segments if s.kind == "text"]
            entry = {"prompt": p, "segments": [{"text": s.text} if s.kind == "text" else {"image": True}
                                               for s in segments]}
            if images:
                entry["images"] = str(save_captioned_grid(images, [p] * len(images), out_dir / f"interleaved_{k}.png"))
            entry["text"] = " ".join(texts)
            outputs.append(entry)
        record["interleaved"] = outputs
    (out_dir / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return record


@hydra_app("generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
