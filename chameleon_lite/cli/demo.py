"""The main job (`make demo`): shapes world -> tokenizers -> train -> sample -> evaluate, on CPU.

    python -m chameleon_lite.cli.demo [out_dir=runs/demo] [experiment=shapes_cpu] [any chameleon-train override ...]

Steps, each printing where its output went:
1. a PNG grid of shapes-world samples with their captions;
2. the tokenizers (the shipped ``tokenizers/shapes`` unless missing, then rebuilt);
3. ``chameleon-train`` with the demo recipe (``experiment=shapes_demo`` unless overridden);
4. text->image samples for a few prompts and captions for a few test images (PNG grids);
5. shapes-GenEval and captioning accuracy on a slice of the test split, printed as tables.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chameleon_lite.config import compose_config, quoted, resolve_path

DEMO_PROMPTS = ["a red circle", "three green squares", "a blue square left of a yellow circle",
                "a purple triangle and a purple circle"]


def split_args(argv: list[str]) -> tuple[Path, list[str], list[str]]:
    out_dir, train_overrides, eval_overrides = Path("runs/demo"), [], []
    for arg in argv:
        if arg.startswith("out_dir="):
            out_dir = Path(arg.split("=", 1)[1])
        elif arg.startswith("eval."):
            eval_overrides.append(arg[len("eval."):])
        else:
            train_overrides.append(arg)
    if not any(a.startswith("experiment=") for a in train_overrides):
        train_overrides.insert(0, "experiment=shapes_demo")
    return resolve_path(out_dir), train_overrides, eval_overrides


def main(argv: list[str] | None = None) -> dict:
    from chameleon_lite.cli.eval import evaluate
    from chameleon_lite.cli.train import train
    from chameleon_lite.data.shapes import ShapesWorld
    from chameleon_lite.generation.api import Generator
    from chameleon_lite.viz import save_captioned_grid

    out_dir, train_overrides, eval_overrides = split_args(sys.argv[1:] if argv is None else argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    print("[demo 1/5] shapes-world samples")
    world = ShapesWorld(seed=0, split="train", length=16)
    samples = [world[i] for i in range(16)]
    grid = save_captioned_grid([s.image for s in samples], [s.caption for s in samples], out_dir / "shapes_samples.png")
    print(f"  -> {grid}")

    cfg = compose_config("train", [*train_overrides, quoted("run_dir", out_dir / "train"), quoted("run_name", out_dir.name)])
    print(f"[demo 2/5] tokenizers: {cfg.tokenizer.dir}")
    ensure_tokenizers(Path(cfg.tokenizer.dir))

    print(f"[demo 3/5] training ({' '.join(train_overrides)}) ...")
    result = train(cfg)
    ckpt = Path(result["run_dir"]) / "checkpoints" / "last.ckpt"
    print(f"  -> {ckpt} after {result['global_step']} steps; loss curve {Path(result['run_dir']) / 'loss_curve.png'}")

    print("[demo 4/5] sampling")
    gen = Generator.load(ckpt)
    sampling = compose_config("eval", [quoted("ckpt", ckpt), *eval_overrides])  # the eval's sampling and reranking
    images = gen.generate_images(DEMO_PROMPTS, n=4, cfg_scale=sampling.cfg_scale,
                                 temperature=sampling.image_temperature, seed=0,
                                 candidates=sampling.image_candidates)
    t2i = save_captioned_grid(images, [p for p in DEMO_PROMPTS for _ in range(4)], out_dir / "samples_t2i.png", nrow=4)
    test = ShapesWorld(seed=0, split="test", length=8)
    test_images = [test[i].image for i in range(8)]
    captions = gen.caption(test_images, candidates=sampling.caption_candidates,
                           candidate_temperature=sampling.caption_candidate_temperature)
    cap = save_captioned_grid(test_images, captions, out_dir / "samples_captions.png", nrow=4)
    print(f"  -> {t2i}\n  -> {cap}")

    print("[demo 5/5] evaluation")
    tables = {}
    for task in ("geneval", "caption"):
        ecfg = compose_config("eval", [f"task={task}", quoted("ckpt", ckpt), quoted("out_dir", out_dir / "eval"), *eval_overrides])
        res = evaluate(ecfg)
        tables[task] = res["table"]
        print(f"\n## {task}\n{res['table']}")
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min; outputs in {out_dir}")
    return {"ckpt": str(ckpt), "tables": tables}


def ensure_tokenizers(tok_dir: Path) -> None:
    """Rebuild whatever tokenizer artifact is missing (the shipped ones normally exist)."""
    if not (tok_dir / "text.model").is_file() or not (tok_dir / "vocab.json").is_file():
        from chameleon_lite.cli.tokenizer import build_tokenizer

        # (overwrite: the one artifact left of a half-built directory is rebuilt with the other, bit-identically)
        build_tokenizer(compose_config("train_tokenizer", [quoted("tokenizer.dir", tok_dir), "overwrite=true"]))
    if not (tok_dir / "vq.safetensors").is_file():
        from chameleon_lite.cli.train_vq import train_vq

        train_vq(compose_config("train_vq", [quoted("out_dir", tok_dir)]))


if __name__ == "__main__":
    main()
