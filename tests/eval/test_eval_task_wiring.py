"""`chameleon-eval`'s tasks score what they claim to: the right image with the right prompt, the right
caption with the right image, the grid titles from the records, perplexity as exp(mean CE).

The model's sampling is stubbed on the `Generator` class (`evaluate` loads a real one from the tiny checkpoint):
images / captions whose correctness the test knows from the shapes world itself, so a mispairing of images and
prompts, captions and images, or titles and records changes the scores these tests compute independently."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from chameleon_lite import viz
from chameleon_lite.cli.eval import evaluate
from chameleon_lite.config import ConfigError, compose_config
from chameleon_lite.data.sequences import IGNORE_INDEX
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.eval.geneval import describe_detections
from chameleon_lite.eval.perplexity import validation_loader
from chameleon_lite.eval.scoring import score_caption, score_generated_image
from chameleon_lite.generation.api import Generator

N_PROMPTS, IMAGES_PER_PROMPT, N_IMAGES = 10, 2, 12  # 10 prompts: chunks of 4, 4, 2 (the last one partial)


def eval_cfg(ckpt, tmp_path, task, *extra):
    return compose_config("eval", [f"task={task}", f"ckpt={ckpt}", f"out_dir={tmp_path / 'out'}",
                                   f"n_prompts={N_PROMPTS}", f"images_per_prompt={IMAGES_PER_PROMPT}",
                                   "image_candidates=1", f"n_images={N_IMAGES}", "caption_candidates=1",
                                   f"data.cache_dir={tmp_path / 'cache'}", *extra])


def world_of(cfg, n):
    """The eval's world, built here from the config (not through `cli.eval._world`)."""
    return ShapesWorld(seed=cfg.seed, image_size=cfg.data.image_size, split=cfg.split, length=n,
                       holdout_pairs=[tuple(p) for p in cfg.data.holdout_pairs],
                       val_holdout_pairs=[tuple(p) for p in cfg.data.val_holdout_pairs], layout=cfg.data.layout)


def category_mean(records, metric):
    """GenEval's overall: the mean over categories of each category's accuracy."""
    cats = {}
    for r in records:
        cats.setdefault(r["category"], []).append(float(r[metric]))
    return sum(sum(v) / len(v) for v in cats.values()) / len(cats)


def markdown_rows(text):
    lines = text.strip().splitlines()
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    assert set(lines[1]) <= set("|-")
    return [dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|")), strict=True))
            for line in lines[2:]]


def assert_markdown_matches_summary(md_text, summary, metrics):
    """Every figure of the .md table is the JSON summary's (to its 3 printed decimals), row by row."""
    rows = {r["category"]: r for r in markdown_rows(md_text)}
    parts = {cat: (stats, None) for cat, stats in summary["per_category"].items()}
    parts["**overall**"] = (summary["overall"], "overall")
    if summary["heldout"]["n"]:
        parts["seen pairs"], parts["held-out pairs"] = (summary["seen"], "seen"), (summary["heldout"], "heldout")
    assert set(rows) == set(parts)
    for name, (stats, part) in parts.items():
        row = rows[name]
        assert int(row["n"]) == stats["n"], name
        for metric in metrics:
            if metric in stats:
                assert float(row[metric]) == pytest.approx(stats[metric], abs=5e-4), (name, metric)
            else:
                assert row[metric] == "", (name, metric)
        stderr = summary["stderr"][part][metrics[0]] if part else None
        assert (row["s.e."] == "") if stderr is None else float(row["s.e."]) == pytest.approx(stderr, abs=5e-4)


class ImageStub:
    """`Generator.generate_images` returning, per prompt, ``pick(j, renders of the call's prompts)``, n times
    (prompt-major, as documented); remembers the prompts and the returned uint8 images in order."""

    def __init__(self, world, pick):
        self.truth = {}
        for i in range(len(world)):
            sample = world[i]
            self.truth.setdefault(sample.caption, sample)
        self.pick, self.calls, self.drawn_for, self.images = pick, [], [], []

    def __get__(self, gen, owner=None):  # set on the class: bound like the method it replaces
        return self if gen is None else (lambda *args, **kwargs: self(gen, *args, **kwargs))

    def __call__(self, gen, prompts, n=1, **kwargs):
        self.calls.append((list(prompts), n))
        renders = [self.truth[p].image for p in prompts]  # KeyError: a prompt not of the eval's world
        out = []
        for j, prompt in enumerate(prompts):
            image = self.pick(j, renders)
            for _ in range(n):
                out.append(image)
                self.drawn_for.append(prompt)
                self.images.append(image)
        return torch.stack(out).float() / 255  # float in [0, 1], as the real method returns


def rotated(j, renders):
    return renders[(j + 1) % len(renders)]


@pytest.fixture
def grid_calls(monkeypatch):
    """Record what the eval asks `save_captioned_grid` to draw, and draw it."""
    real, calls = viz.save_captioned_grid, []

    def record(images, captions, path, **opts):
        calls.append({"images": [torch.as_tensor(x) for x in images], "captions": list(captions), "path": path})
        return real(images, captions, path, **opts)

    monkeypatch.setattr(viz, "save_captioned_grid", record)
    return calls


# ------------------------------------------------------------------ geneval
def test_geneval_scores_each_image_against_the_prompt_it_was_drawn_for(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "geneval", "grid_examples=0")
    world = world_of(cfg, N_PROMPTS)
    stub = ImageStub(world, lambda j, renders: renders[j])
    monkeypatch.setattr(Generator, "generate_images", stub)
    res = evaluate(cfg)

    assert [n for _, n in stub.calls] == [IMAGES_PER_PROMPT] * len(stub.calls)
    assert [p for prompts, _ in stub.calls for p in prompts] == [world[i].caption for i in range(N_PROMPTS)]
    records = res["records"]
    assert len(records) == N_PROMPTS * IMAGES_PER_PROMPT
    for k, record in enumerate(records):  # prompt-major: image k belongs to prompt k // images_per_prompt
        sample = world[k // IMAGES_PER_PROMPT]
        assert record["prompt"] == stub.drawn_for[k] == sample.caption, k
        assert (record["category"], record["heldout"]) == (sample.category, sample.heldout), k
        assert record["reading"] == describe_detections(stub.images[k]), k
    assert all(r["correct"] for r in records), [r for r in records if not r["correct"]]
    assert res["summary"]["overall"]["accuracy"] >= 0.99
    written = json.loads((tmp_path / "out" / "geneval.json").read_text())
    assert written["summary"] == res["summary"] and written["records"] == records
    assert_markdown_matches_summary((tmp_path / "out" / "geneval.md").read_text(), written["summary"], ["accuracy"])


def test_geneval_images_of_other_prompts_score_what_they_show(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "geneval", "grid_examples=0")
    world = world_of(cfg, N_PROMPTS)
    stub = ImageStub(world, rotated)  # each prompt gets the render of the next prompt of its batch
    monkeypatch.setattr(Generator, "generate_images", stub)
    res = evaluate(cfg)

    specs = {world[i].caption: world[i].spec for i in range(N_PROMPTS)}
    expected = [bool(score_generated_image(image, specs[prompt])["correct"])
                for image, prompt in zip(stub.images, stub.drawn_for)]
    # the stub really handed each prompt another prompt's picture
    assert all(not torch.equal(image, stub.truth[p].image) for image, p in zip(stub.images, stub.drawn_for))
    assert [r["prompt"] for r in res["records"]] == stub.drawn_for
    assert [r["correct"] for r in res["records"]] == expected
    assert [r["reading"] for r in res["records"]] == [describe_detections(x) for x in stub.images]
    want = category_mean([{"category": r["category"], "ok": ok} for r, ok in zip(res["records"], expected)], "ok")
    assert res["summary"]["overall"]["accuracy"] == pytest.approx(want)
    assert want < 0.3


# ------------------------------------------------------------------ captioning
def caption_stub(world, shift):
    truth = {world[i].image.numpy().tobytes(): i for i in range(len(world))}

    def caption(gen, images, **kwargs):
        index = [truth[torch.as_tensor(x).cpu().numpy().tobytes()] for x in images]
        return [world[index[(j + shift) % len(index)]].caption for j in range(len(index))]

    return caption


def test_caption_of_the_truth_is_exact_and_the_table_shows_the_json(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "caption", "grid_examples=0")
    world = world_of(cfg, N_IMAGES)
    monkeypatch.setattr(Generator, "caption", caption_stub(world, 0))
    res = evaluate(cfg)

    assert [(r["truth"], r["caption"]) for r in res["records"]] == [(world[i].caption,) * 2 for i in range(N_IMAGES)]
    assert all(r["exact"] for r in res["records"])
    assert res["summary"]["overall"]["exact"] == 1.0
    for metric in ("shape", "colour", "count", "relation"):
        assert res["summary"]["overall"][metric] == 1.0, metric
    written = json.loads((tmp_path / "out" / "caption.json").read_text())
    assert written["summary"] == res["summary"]
    md = (tmp_path / "out" / "caption.md").read_text()
    assert md == res["table"]
    assert_markdown_matches_summary(md, written["summary"], ["exact", "shape", "colour", "count", "relation"])


def test_captions_of_other_images_score_low(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "caption", "grid_examples=0")
    world = world_of(cfg, N_IMAGES)
    monkeypatch.setattr(Generator, "caption", caption_stub(world, 1))
    res = evaluate(cfg)

    samples = [world[i] for i in range(N_IMAGES)]
    given = [samples[(i + 1) % N_IMAGES].caption for i in range(N_IMAGES)]  # one batch of 12
    expected = [bool(score_caption(c, s)["exact"]) for c, s in zip(given, samples)]
    assert [r["caption"] for r in res["records"]] == given
    assert [r["exact"] for r in res["records"]] == expected
    want = category_mean([{"category": s.category, "ok": ok} for s, ok in zip(samples, expected)], "ok")
    assert res["summary"]["overall"]["exact"] == pytest.approx(want) and want < 0.3


# ------------------------------------------------------------------ grids
def test_geneval_grid_titles_carry_prompt_reading_and_verdict(tiny_checkpoint, tmp_path, monkeypatch, grid_calls):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "geneval", "grid_examples=6")
    blank = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    stub = ImageStub(world_of(cfg, N_PROMPTS), lambda j, renders: renders[j] if j % 2 == 0 else blank)
    monkeypatch.setattr(Generator, "generate_images", stub)
    res = evaluate(cfg)

    (call,) = grid_calls
    records = res["records"]
    assert call["captions"] == [f"{'OK' if r['correct'] else 'X'} {r['prompt']}\nsaw: {r['reading']}"
                                for r in records[:6]]
    # prompts 0 and 2 got their render, prompt 1 a blank canvas: both marks, each with its own image
    assert [r["correct"] for r in records[:6]] == [True, True, False, False, True, True]
    assert records[2]["reading"] == "nothing" and records[0]["reading"] != "nothing"
    assert all(torch.equal(a, b) for a, b in zip(call["images"], stub.images[:6], strict=True))
    path = tmp_path / "out" / "geneval_examples.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["grid"] == str(path) == json.loads((tmp_path / "out" / "geneval.json").read_text())["grid"]


def test_caption_grid_titles_carry_caption_and_verdict(tiny_checkpoint, tmp_path, monkeypatch, grid_calls):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "caption", "grid_examples=5")
    world = world_of(cfg, N_IMAGES)
    monkeypatch.setattr(Generator, "caption", caption_stub(world, 1))
    res = evaluate(cfg)

    (call,) = grid_calls
    records = res["records"]
    assert call["captions"] == [f"{'OK' if r['exact'] else 'X'} {r['caption']}" for r in records[:5]]
    assert all(torch.equal(x, world[i].image) for i, x in enumerate(call["images"]))  # the captioned images
    assert len(call["images"]) == 5 and (tmp_path / "out" / "caption_examples.png").is_file()


def test_composition_grid_is_drawn_from_its_records(tiny_checkpoint, tmp_path, grid_calls):
    res = evaluate(eval_cfg(tiny_checkpoint, tmp_path, "composition", "n_probe=1"))
    (call,) = grid_calls
    records = res["records"]
    assert len(records) == 2 and [r["heldout"] for r in records] == [False, True]
    assert call["captions"] == [f"{r['truth']}{' (held out)' if r['heldout'] else ''}\ncaption dir: "
                                f"{r['caption']['reading']}\nimage dir: {r['image']['reading']}" for r in records]
    assert (tmp_path / "out" / "composition_examples.png").is_file()
    assert res["grid"].endswith("composition_examples.png")


@pytest.mark.parametrize(("task", "error"), [("geneval", OSError("disk full")), ("caption", ValueError("bad font"))])
def test_a_grid_that_cannot_be_drawn_loses_no_scores(tiny_checkpoint, tmp_path, monkeypatch, caplog, task, error):
    cfg = eval_cfg(tiny_checkpoint, tmp_path, task, "grid_examples=4")
    world = world_of(cfg, max(N_PROMPTS, N_IMAGES))
    monkeypatch.setattr(Generator, "generate_images", ImageStub(world, lambda j, renders: renders[j]))
    monkeypatch.setattr(Generator, "caption", caption_stub(world, 0))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(viz, "save_captioned_grid", fail)
    with caplog.at_level(logging.ERROR, logger="chameleon_lite.cli.eval"):
        res = evaluate(cfg)
    out = tmp_path / "out"
    written = json.loads((out / f"{task}.json").read_text())
    metric = "accuracy" if task == "geneval" else "exact"
    assert written["summary"] == res["summary"] and written["summary"]["overall"][metric] == 1.0
    assert len(written["records"]) == (N_PROMPTS * IMAGES_PER_PROMPT if task == "geneval" else N_IMAGES)
    assert (out / f"{task}.md").read_text() == res["table"]
    assert "grid" not in written and "grid" not in res and not (out / f"{task}_examples.png").exists()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert messages == [f"the examples grid could not be drawn ({error}); the results are in {out / f'{task}.json'}"]


# ------------------------------------------------------------------ perplexity
def test_perplexity_is_exp_of_the_mean_ce_over_the_batches_evaluated(tiny_checkpoint, tiny_generator, tmp_path):
    max_batches = 2
    cfg = eval_cfg(tiny_checkpoint, tmp_path, "perplexity", f"max_batches={max_batches}", "data.n_val=32",
                   "data.seq_len=256")
    res = evaluate(cfg)
    summary = res["summary"]
    assert set(summary) == {"all", "text", "image"}
    for name, stats in summary.items():
        assert stats["perplexity"] == pytest.approx(math.exp(stats["ce"]), rel=1e-5), name
        assert isinstance(stats["tokens"], int) and stats["tokens"] > 0, name
    assert summary["all"]["tokens"] == summary["text"]["tokens"] + summary["image"]["tokens"]
    assert summary["all"]["ce"] == pytest.approx((summary["text"]["ce"] * summary["text"]["tokens"] + summary["image"]
                                                  ["ce"] * summary["image"]["tokens"]) / summary["all"]["tokens"])

    # recount and recompute over the first max_batches batches of the same rows, with plain cross-entropy
    gen = tiny_generator
    batches = list(validation_loader(cfg.data, gen.tok, 256))
    assert len(batches) > max_batches  # else max_batches would not be exercised
    is_image_id = gen.vocab.image_mask()
    sums, counts = {"text": 0.0, "image": 0.0}, {"text": 0, "image": 0}
    for batch in batches[:max_batches]:
        with torch.inference_mode():
            logits = gen.model(batch["input_ids"], positions=batch["positions"], doc_lens=batch["doc_lens"])
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
        counted = labels != IGNORE_INDEX
        image = counted & is_image_id[labels.clamp(min=0)]
        for name, mask in (("text", counted & ~image), ("image", image)):
            sums[name] += float(ce[mask].sum())
            counts[name] += int(mask.sum())
    assert {k: summary[k]["tokens"] for k in counts} == counts
    for name, count in counts.items():
        assert summary[name]["ce"] == pytest.approx(sums[name] / count, rel=1e-4), name
    rows = {r["target"]: r for r in markdown_rows(res["table"])}
    assert set(rows) == set(summary) and all(int(rows[k]["tokens"]) == summary[k]["tokens"] for k in summary)
    assert (tmp_path / "out" / "perplexity.md").read_text() == res["table"]


@pytest.mark.parametrize("task", ["geneval", "caption"])
def test_sample_seed_redraws_the_noise_of_the_same_prompts(tiny_checkpoint, tmp_path, monkeypatch, task):
    """``sample_seed`` null is ``seed``'s noise (the results of before the key, protocol included); another value
    keeps the prompts (images) and draws other samples, so two such evals pair up in compare_evals --paired."""
    method = "generate_images" if task == "geneval" else "caption"
    real, calls = getattr(Generator, method), []

    def record(self, inputs, *args, **kwargs):
        calls[-1].append((list(inputs) if task == "geneval" else len(inputs), kwargs["seed"]))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Generator, method, record)

    def run(name, *extra):
        calls.append([])
        evaluate(eval_cfg(tiny_checkpoint, tmp_path / name, task, "grid_examples=0", *extra))
        return calls[-1], json.loads((tmp_path / name / "out" / f"{task}.json").read_text())

    (default, d_json), (same, s_json), (other, o_json) = run("a"), run("b", "sample_seed=1234"), run("c", "sample_seed=7")
    assert default == same and "sample_seed" not in d_json["settings"]
    assert s_json["settings"] == d_json["settings"] and o_json["settings"]["sample_seed"] == 7  # seed's noise: same
    assert [inputs for inputs, _ in other] == [inputs for inputs, _ in default]  # the same prompts / images
    assert [r["prompt" if task == "geneval" else "truth"] for r in o_json["records"]] == \
        [r["prompt" if task == "geneval" else "truth"] for r in d_json["records"]]
    assert not {seed for _, seed in other} & {seed for _, seed in default}  # other noise throughout
    with pytest.raises(ConfigError, match="sample_seed"):
        evaluate(eval_cfg(tiny_checkpoint, tmp_path / "bad", task, "sample_seed=-1"))


@pytest.mark.parametrize("task", ["geneval", "caption", "composition"])
def test_scoring_tasks_on_another_data_source_are_refused_before_the_model_loads(tmp_path, task):
    """They draw shapes-world prompts and score with its detector and grammar: ``data=jsonl`` stopped with an
    omegaconf traceback after loading the model."""
    cfg = eval_cfg(tmp_path / "no-such-model", tmp_path, task, "data=jsonl", "data.train_path=x.jsonl")
    with pytest.raises(ConfigError, match="data.source=jsonl"):
        evaluate(cfg)
