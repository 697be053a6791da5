"""`chameleon-eval`: shapes-GenEval, captioning accuracy, perplexity, a composition probe, VQ reconstruction.

Every task writes ``<task>.json`` and ``<task>.md`` into ``out_dir`` and (for model tasks) a PNG grid
of examples with the prompt, the detector's reading and OK/X.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from chameleon_lite.config import ConfigError, hydra_app, require, resolve_path
from chameleon_lite.eval.report import STDERR_COLUMN, category_rows, markdown_table, write_report

log = logging.getLogger(__name__)
TASKS = ("geneval", "caption", "perplexity", "composition", "vq")
#: The options each task's result depends on (besides ckpt, split and data.*), recorded in its JSON so that
#: results can be compared only with results of the same protocol (`chameleon_lite.cli.compare_evals`).
SETTINGS = {
    "geneval": ("n_prompts", "images_per_prompt", "cfg_scale", "image_temperature", "image_top_k",
                "image_candidates", "image_rerank", "image_rerank_edits", "image_negative_scale",
                "image_negative_edits", "seed", "sample_seed", "quantize"),
    "caption": ("n_images", "caption_temperature", "caption_cfg_scale", "caption_candidates",
                "caption_candidate_temperature", "scene_search", "seed", "sample_seed", "quantize"),
    "composition": ("n_probe", "seed"),
    "perplexity": ("max_batches",),
}
#: The counts each task draws (validated as ints >= 1 before the model loads).
COUNTS = {"geneval": ("n_prompts", "images_per_prompt", "image_candidates"), "caption": ("n_images",),
          "composition": ("n_probe",), "perplexity": ("max_batches",)}
#: The data settings each task's result depends on: the shapes world its images come from (perplexity: also
#: the val documents and their loss mask). Paths and training-only keys are left out so that runs compare.
WORLD = ("image_size", "holdout_pairs", "val_holdout_pairs", "layout")
DATA_KEYS = {task: WORLD for task in SETTINGS} | {
    "perplexity": (*WORLD, "seed", "n_val", "seq_len", "overflow", "tasks", "loss_on", "caption_target")}


def protocol(cfg: DictConfig) -> dict:
    """split, settings and data of a result: what must agree before two results may be compared."""
    def plain(value):
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    settings = {k: plain(cfg[k]) for k in SETTINGS[cfg.task]}
    if settings.get("image_negative_scale") == 0:
        settings.pop("image_negative_edits")  # no negatives drawn: which edits would make them is moot
    if "image_rerank" in settings and (settings["image_rerank"] == "caption" or settings["image_candidates"] == 1):
        # the default ranking (or none): the protocol of results written before the option existed
        settings.pop("image_rerank")
        settings.pop("image_rerank_edits")
    if "sample_seed" in settings and settings["sample_seed"] in (None, cfg.seed):  # the noise of `seed`: the
        settings.pop("sample_seed")                                              # protocol of results before the key
    if "scene_search" in settings and settings["scene_search"]["rounds"] == 0:
        settings["scene_search"] = {"rounds": 0}
    return {"split": "val" if cfg.task == "perplexity" else cfg.split, "settings": settings,
            "data": {k: _without_zero_tasks(k, plain(cfg.data[k])) for k in DATA_KEYS[cfg.task] if k in cfg.data}}


def _without_zero_tasks(key: str, value):
    """``data.tasks`` as the documents it draws: a weight-0 task (``uncond: 0``, listed since 2026-11-24) draws
    none, so results from before it was listed still compare."""
    return {task: w for task, w in value.items() if w} if key == "tasks" else value


def _noise_seed(cfg: DictConfig) -> int:
    """The seed of the sampling noise: ``sample_seed``, or ``seed`` (which also draws the scenes) when null."""
    return cfg.seed if cfg.get("sample_seed") is None else cfg.sample_seed


def _world(cfg: DictConfig, n: int):
    from chameleon_lite.data.shapes import ShapesWorld

    return ShapesWorld(seed=cfg.seed, image_size=cfg.data.image_size, split=cfg.split, length=n,
                       holdout_pairs=tuple(tuple(p) for p in cfg.data.holdout_pairs),
                       val_holdout_pairs=tuple(tuple(p) for p in cfg.data.get("val_holdout_pairs", ())),
                       layout=cfg.data.layout)


def _check_world(cfg: DictConfig, gen) -> None:
    """Warn when the model was trained on a shapes world whose held-out pairs or layout differ from the
    one this evaluation draws (its held-out / seen split would then not mean 'never seen in training')."""
    trained = gen.meta.get("training_data") or {}
    if trained.get("source") not in (None, "shapes"):
        log.warning("%s was trained on data.source=%s, not on the shapes world this evaluation draws its prompts and "
                    "images from: its scores say how it transfers to shapes, not how it does on its own data (for that: "
                    "val/loss in runs/<run>/logs/metrics.csv)", cfg.ckpt, trained["source"])
    if trained.get("source") != "shapes":
        return
    here = OmegaConf.to_container(cfg.data, resolve=True)
    differ = [k for k in ("holdout_pairs", "val_holdout_pairs", "layout", "image_size") if k in trained and _canonical(trained[k]) != _canonical(here.get(k, []))]
    if differ:
        log.warning("%s was trained on a shapes world with %s; this evaluation uses %s. Its held-out / seen "
                    "split is then not what the model never / did see: pass %s to evaluate on its world "
                    "(or keep this, e.g. to score a model trained on every pair against the usual held-out pairs)",
                    cfg.ckpt, ", ".join(f"data.{k}={trained[k]}" for k in differ),
                    ", ".join(f"data.{k}={here.get(k)}" for k in differ),
                    " ".join(f"data.{k}={_override(trained[k])}" for k in differ))


def _canonical(value):
    """Pairs as a set of tuples (their order means nothing); other values as they are."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        return frozenset(tuple(v) for v in value)
    return value


def _override(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def _generator(cfg: DictConfig):
    from chameleon_lite.generation.api import Generator

    if not cfg.ckpt:
        raise ConfigError(f"task={cfg.task} needs ckpt=path/to/last.ckpt (or an exported model dir)")
    return Generator.load(resolve_path(cfg.ckpt), device=cfg.device, quantize=cfg.quantize,
                         compile=cfg.compile, cuda_graphs=cfg.cuda_graphs)


def _grid(examples: list, path: Path, n: int) -> str:
    from chameleon_lite.viz import save_captioned_grid

    chosen = examples[:n]
    return str(save_captioned_grid([e[0] for e in chosen], [e[1] for e in chosen], path, nrow=4))


def evaluate(cfg: DictConfig) -> dict:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is invalid: use one of {', '.join(TASKS)}")
    out_dir = resolve_path(cfg.out_dir)
    if cfg.task == "vq":
        from chameleon_lite.eval.vq_metrics import run_vq_eval

        if cfg.get("ckpt") is not None:
            log.warning("task=vq evaluates the VQ in tokenizer.dir=%s; ckpt=%s is not read (for the tokenizers a model "
                        "was trained with, pass their dir: tokenizer.dir=...)", cfg.tokenizer.dir, cfg.ckpt)
        result = run_vq_eval(cfg)
        return {**result, "table": result.get("table", "")}
    source = cfg.data.get("source", "shapes")
    if source != "shapes" and cfg.task != "perplexity":  # (perplexity: its own error)
        raise ConfigError(f"task={cfg.task} scores on the shapes world (its detector and caption grammar), which "
                          f"data.source={source} has neither: leave data at its default to score the model on shapes "
                          "prompts and images; for your own data read val/loss in runs/<run>/logs/metrics.csv")
    for key in COUNTS[cfg.task]:  # before the model loads: a zero would score nothing or fail deep in sampling
        if key == "max_batches" and cfg.get(key) is None:
            continue  # null: every validation batch
        require(cfg, key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
    if "sample_seed" in SETTINGS.get(cfg.task, ()):
        require(cfg, "sample_seed", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                "null (the noise of seed) or an int >= 0")
    require(cfg, "grid_examples", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "an int >= 0 (0 = no grid)")
    gen = _generator(cfg)
    _check_world(cfg, gen)
    if cfg.task == "geneval":
        from chameleon_lite.eval.geneval import RERANKS, run_geneval
        from chameleon_lite.eval.scene_search import EDITS

        require(cfg, "image_negative_scale", lambda v: isinstance(v, (int, float)) and v >= 0,
                "a number >= 0 (0 = off)")
        require(cfg, "image_negative_edits", lambda v: OmegaConf.is_list(v) and len(v) > 0 and set(v) <= set(EDITS),
                f"a non-empty list of {', '.join(EDITS)}")
        require(cfg, "image_rerank", lambda v: v in RERANKS, f"one of {', '.join(RERANKS)}")
        require(cfg, "image_rerank_edits", lambda v: OmegaConf.is_list(v) and len(v) > 0 and set(v) <= set(EDITS),
                f"a non-empty list of {', '.join(EDITS)}")
        if cfg.image_negative_scale > 0 and cfg.cfg_scale is None:
            raise ConfigError("image_negative_scale > 0 adds to classifier-free guidance: set cfg_scale "
                              "(e.g. cfg_scale=2.0) or image_negative_scale=0")
        summary, records, examples = run_geneval(gen, _world(cfg, cfg.n_prompts), cfg.n_prompts, cfg.images_per_prompt,
                                                 cfg.cfg_scale, cfg.image_temperature, cfg.image_top_k,
                                                 _noise_seed(cfg),
                                                 candidates=cfg.image_candidates,
                                                 negative_scale=cfg.image_negative_scale,
                                                 negative_edits=list(cfg.image_negative_edits),
                                                 rerank=cfg.image_rerank, rerank_edits=list(cfg.image_rerank_edits))
        table = markdown_table(category_rows(summary, ["accuracy"]), ["category", "n", "accuracy", STDERR_COLUMN])
    elif cfg.task == "caption":
        from chameleon_lite.eval.captioning import run_captioning

        require(cfg, "scene_search.rounds", lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0 = off)")
        require(cfg, "scene_search.caption_weight", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0")

        summary, records, examples = run_captioning(gen, _world(cfg, cfg.n_images), cfg.n_images,
                                                    cfg.caption_temperature, _noise_seed(cfg), cfg.caption_cfg_scale,
                                                    candidates=cfg.caption_candidates,
                                                    candidate_temperature=cfg.caption_candidate_temperature,
                                                    search_rounds=cfg.scene_search.rounds,
                                                    search_caption_weight=cfg.scene_search.caption_weight)
        keys = ["exact", "shape", "colour", "count", "relation"]
        table = markdown_table(category_rows(summary, keys), ["category", "n", "exact", STDERR_COLUMN, *keys[1:]])
    elif cfg.task == "composition":
        from chameleon_lite.eval.composition import METRICS, probe_rows, run_composition_probe

        summary, records, examples = run_composition_probe(gen, _world(cfg, 1), cfg.n_probe)
        table = markdown_table(probe_rows(summary), ["pairs", "n", "direction", *METRICS])
    else:
        from chameleon_lite.eval.perplexity import evaluate_perplexity, validation_loader

        seq_len = min(cfg.data.seq_len, gen.model.cfg.max_seq_len)
        if seq_len < cfg.data.seq_len:
            log.info("data.seq_len=%d exceeds the model's max_seq_len: rows of %d tokens", cfg.data.seq_len, seq_len)
            cfg.data.seq_len = seq_len  # what the result records is what was packed
        loader = validation_loader(cfg.data, gen.tok, seq_len)
        summary = evaluate_perplexity(gen.model, gen.vocab, loader, cfg.max_batches)
        records, examples = [], []
        table = markdown_table([{"target": k, **v} for k, v in summary.items()], ["target", "perplexity", "ce", "tokens"])
    result = {"task": cfg.task, "ckpt": str(cfg.ckpt), **protocol(cfg), "summary": summary, "records": records}
    files = write_report(out_dir, cfg.task, result, table)  # first: the scores outlive a grid that cannot be drawn
    if examples and cfg.grid_examples:
        try:
            result["grid"] = _grid(examples, out_dir / f"{cfg.task}_examples.png", cfg.grid_examples)
        except (OSError, ValueError) as err:
            log.error("the examples grid could not be drawn (%s); the results are in %s", err, files["json"])
        else:
            write_report(out_dir, cfg.task, result, table)  # now naming the grid
    result["files"] = files
    result["table"] = table
    print(table)
    return result


@hydra_app("eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
