"""train (fixture) -> generate -> evaluate -> notebook, on a tiny checkpoint, through the real CLIs' functions."""

import json
import logging
import os

import pytest
import torch
from conftest import compose_config

from chameleon_lite.cli.eval import evaluate
from chameleon_lite.cli.generate import generate
from chameleon_lite.config import REPO_ROOT, ConfigError
from chameleon_lite.generation.api import Generator

pytestmark = pytest.mark.slow


def test_generate_cli_tasks(tiny_checkpoint, tmp_path):
    for task, extra in [("t2i", ["n=2", "prompt=[a red circle,two blue squares]", "image_candidates=2",
                                 "negative_prompt=a red square"]),
                        ("text", ["prompt=a red", "max_new_tokens=8"]),
                        ("interleaved", ["prompt=a red", "max_new_tokens=80"])]:
        out = tmp_path / task
        rec = generate(compose_config("generate", [f"ckpt={tiny_checkpoint}", f"task={task}", f"out_dir={out}", *extra]))
        assert json.loads((out / "generate.json").read_text())["task"] == task
        if task == "t2i":
            assert (out / "t2i.png").is_file() and rec["prompts"] == ["a red circle", "two blue squares"]
            assert rec["negative_prompts"] == ["a red square"] * 2
    # caption an image file written by the t2i run
    out = tmp_path / "caption"
    rec = generate(compose_config("generate", [f"ckpt={tiny_checkpoint}", "task=caption",
                                               f"image={tmp_path / 't2i' / 't2i.png'}", f"out_dir={out}",
                                               "caption_candidates=3"]))
    assert len(rec["captions"]) == 1 and (out / "captions.png").is_file()


@pytest.mark.parametrize(("overrides", "match"), [
    (["prompt=[a,b]", "negative_prompt=[c,d,e]"], "negative_prompt has 3 texts for 2 prompts"),
    (["prompt=a", "negative_prompt=b", "cfg_scale=null"], "set cfg_scale"),
    (["task=text", "prompt=null"], r"task=text needs prompt="),
    (["task=interleaved", "prompt=[]"], r"task=interleaved needs prompt="),
    (["task=caption"], "task=caption needs image="),
    (["task=caption", "image=[missing.png]"], "no such file.*missing.png"),
    (["task=sketch"], "task='sketch' is invalid"),
])
def test_generate_checks_its_inputs_before_loading_the_model(tmp_path, overrides, match):
    # the checkpoint does not exist: each error must come before the (possibly long) model load
    with pytest.raises(ConfigError, match=match):
        generate(compose_config("generate", [f"ckpt={tmp_path / 'never_loaded.ckpt'}", f"out_dir={tmp_path}",
                                             *overrides]))


def test_generator_images_are_decoded_and_seeded(tiny_checkpoint):
    gen = Generator.load(tiny_checkpoint)
    a = gen.generate_images(["a red circle"], n=2, cfg_scale=2.0, seed=3)
    b = gen.generate_images(["a red circle"], n=2, cfg_scale=2.0, seed=3)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        Generator.load(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("task", ["geneval", "caption", "perplexity", "caption scene_search.rounds=2",
                                  "composition n_probe=2", "geneval image_negative_scale=1.0 image_negative_edits=[kind]",
                                  "geneval image_rerank=scene"])
def test_eval_tasks_write_json_markdown_grid(tiny_checkpoint, tmp_path, task):
    task, *extra = task.split()
    res = evaluate(compose_config("eval", [f"task={task}", f"ckpt={tiny_checkpoint}", f"out_dir={tmp_path}",
                                           "n_prompts=6", "images_per_prompt=2", "n_images=8", "max_batches=2",
                                           "image_candidates=2", "caption_candidates=2",
                                           f"data.cache_dir={tmp_path / 'cache'}", *extra]))
    assert (tmp_path / f"{task}.json").is_file() and (tmp_path / f"{task}.md").is_file()
    written = json.loads((tmp_path / f"{task}.json").read_text())  # the protocol, for compare_evals
    assert written["split"] == ("val" if task == "perplexity" else "test")
    assert written["data"]["holdout_pairs"] == [["red", "triangle"], ["blue", "diamond"]]
    assert "cache_dir" not in written["data"] and ("loss_on" in written["data"]) == (task == "perplexity")
    if task == "geneval":
        assert written["settings"]["images_per_prompt"] == 2 and written["settings"]["image_candidates"] == 2
        negatives, scene = any("negative" in e for e in extra), any("rerank" in e for e in extra)
        assert ("image_negative_edits" in written["settings"]) == negatives  # moot without negatives
        # the default ranking is recorded as before the option existed, so older results still compare
        assert written["settings"].get("image_rerank") == ("scene" if scene else None)
        assert written["settings"].get("image_rerank_edits") == (["kind"] if scene else None)
    elif task == "caption":
        assert written["settings"]["scene_search"] == ({"rounds": 2, "caption_weight": 0.5} if extra else {"rounds": 0})
    if task == "composition":
        assert res["summary"]["heldout"]["n"] == 2 and 0.0 <= res["summary"]["heldout"]["image"]["exact"] <= 1.0
    elif task != "perplexity":
        assert (tmp_path / f"{task}_examples.png").is_file() and written["grid"].endswith(f"{task}_examples.png")
        metric = "accuracy" if task == "geneval" else "exact"
        assert 0.0 <= res["summary"]["overall"][metric] <= 1.0
        assert 0.0 < written["summary"]["stderr"]["overall"][metric] <= 0.5 and " s.e. |" in res["table"]
    else:
        assert res["summary"]["image"]["perplexity"] > 1.0
        assert written["data"]["seq_len"] == 256  # data.seq_len=1024 is cut to the tiny model's max_seq_len


def test_eval_counts_are_checked_before_loading_and_a_grid_is_optional(tiny_checkpoint, tmp_path):
    for bad in ("n_prompts=0", "images_per_prompt=0", "grid_examples=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            evaluate(compose_config("eval", ["task=geneval", f"ckpt={tmp_path / 'not_loaded.ckpt'}", f"out_dir={tmp_path}", bad]))
    res = evaluate(compose_config("eval", ["task=caption", f"ckpt={tiny_checkpoint}", f"out_dir={tmp_path}",
                                           "n_images=4", "caption_candidates=1", "grid_examples=0"]))
    written = json.loads((tmp_path / "caption.json").read_text())
    assert len(written["records"]) == 4 and "grid" not in written and "grid" not in res
    assert not (tmp_path / "caption_examples.png").exists()


def test_eval_warns_when_the_model_was_trained_on_another_world(tiny_checkpoint, tmp_path, caplog):
    """The checkpoint and the exported model record the training world; an eval that draws another one
    (here: no val pair, so green circles would count as seen) says so and names the override to match."""
    trained = Generator.load(tiny_checkpoint).meta["training_data"]
    assert trained["source"] == "shapes" and trained["val_holdout_pairs"] == [["green", "circle"]]
    exported = tiny_checkpoint.parent.parent / "model" / "config.json"
    assert json.loads(exported.read_text())["training_data"] == trained
    for overrides, warned in ((["data.val_holdout_pairs=[]"], True), ([], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="chameleon_lite.cli.eval"):
            evaluate(compose_config("eval", ["task=composition", "n_probe=1", f"ckpt={tiny_checkpoint}",
                                             f"out_dir={tmp_path / str(warned)}", *overrides]))
        messages = [r.getMessage() for r in caplog.records if "trained on a shapes world" in r.getMessage()]
        assert len(messages) == int(warned)
        if warned:
            assert "pass data.val_holdout_pairs=[[green,circle]]" in messages[0]


@pytest.mark.parametrize("override", ["caption scene_search.rounds=-1", "caption scene_search.caption_weight=-0.5",
                                      "geneval image_negative_scale=-1", "geneval image_negative_scale=1 cfg_scale=null",
                                      "geneval image_negative_edits=[colour]", "geneval image_rerank=clip",
                                      "geneval image_rerank_edits=[colour]"])
def test_eval_bad_setting_names_the_key_before_any_sampling(tiny_checkpoint, tmp_path, override):
    task, *overrides = override.split()
    cfg = compose_config("eval", [f"task={task}", f"ckpt={tiny_checkpoint}", f"out_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=overrides[0].split("=")[0]):
        evaluate(cfg)
    assert not (tmp_path / f"{task}.json").exists()


def test_notebook_runs_top_to_bottom(tiny_checkpoint):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO_ROOT / "notebooks" / "generate.ipynb", as_version=4)
    os.environ["CHAMELEON_CKPT"] = str(tiny_checkpoint)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    finally:
        os.environ.pop("CHAMELEON_CKPT")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]


def test_caption_of_a_file_that_is_not_an_image_names_it(tiny_checkpoint, tmp_path):
    from chameleon_lite.vq.image_io import ImageLoadError

    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a PNG")
    gen = Generator.load(tiny_checkpoint)
    with pytest.raises(ImageLoadError, match="notes.png"):
        gen.caption([str(bad)])


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_checkpoint):
    gen = Generator.load(tiny_checkpoint)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.complete("a red circle " * 200, max_new_tokens=8)


def test_demo_main_job_trains_samples_and_prints_both_tables(tmp_path, capsys):
    """`make demo`'s code path on a tiny config: every step runs and leaves its files."""
    from conftest import TINY_TRAIN

    from chameleon_lite.cli import demo

    out = tmp_path / "my demo (1),x=y"  # a path Hydra would parse as a sweep unless the demo quotes it
    result = demo.main([f"out_dir={out}", *TINY_TRAIN, f"data.cache_dir={tmp_path / 'cache'}",
                        "callbacks.loss_curve=null", "eval.n_prompts=4", "eval.images_per_prompt=1",
                        "eval.n_images=8", "eval.image_candidates=2", "eval.caption_candidates=2",
                        f"eval.data.cache_dir={tmp_path / 'cache'}"])
    for name in ("shapes_samples.png", "samples_t2i.png", "samples_captions.png", "eval/geneval.json",
                 "eval/caption.json", "eval/geneval_examples.png"):
        assert (out / name).is_file(), name
    assert set(result["tables"]) == {"geneval", "caption"} and "**overall**" in result["tables"]["geneval"]
    printed = capsys.readouterr().out
    assert "[demo 5/5] evaluation" in printed and "## caption" in printed
