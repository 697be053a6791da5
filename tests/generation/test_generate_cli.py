"""`chameleon-generate` (chameleon_lite/cli/generate.py) on the tiny generators of tests/conftest.py,
with the real conf/generate.yaml: what each task reads, and what it warns about."""

from __future__ import annotations

import logging

import pytest
import torch
from torchvision.io import read_image

from chameleon_lite.cli.generate import generate
from chameleon_lite.config import compose_config
from chameleon_lite.generation.api import Generator

PROMPT = "two green squares"


@pytest.fixture
def run(monkeypatch, tmp_path):
    """``run(generator, *overrides)``: `generate` with ``Generator.load`` returning ``generator``."""
    def run_(gen: Generator, *overrides: str) -> dict:
        monkeypatch.setattr(Generator, "load", classmethod(lambda cls, *args, **kwargs: gen))
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        return generate(compose_config("generate", ["ckpt=unused.ckpt", f"out_dir={out}", *overrides]))

    return run_


def test_interleaved_default_budget_finishes_an_image(image_first_generator, run):
    """The documented ``task=interleaved`` example: the default budget holds <boi> + 64 codes + <eoi>."""
    record = run(image_first_generator, "task=interleaved", f"prompt={PROMPT}")
    entry = record["interleaved"][0]
    assert entry["segments"] == [{"image": True}] and entry["text"] == ""
    assert read_image(entry["images"]).shape[0] == 3


def test_interleaved_passes_the_image_top_k_and_top_p(image_first_generator, run):
    """Keeping only the best code draws the same image whatever the seed; without a filter the seeds differ."""
    def image(*overrides):
        record = run(image_first_generator, "task=interleaved", f"prompt={PROMPT}", "image_temperature=1.0",
                     *overrides)
        return read_image(record["interleaved"][0]["images"])

    for top in ("image_top_k=1", "image_top_p=1e-6"):
        assert torch.equal(image(top, "seed=0"), image(top, "seed=1"))
    assert not torch.equal(image("seed=0"), image("seed=1"))


@pytest.mark.parametrize("task", ["text", "interleaved"])
def test_text_tasks_pass_the_text_top_k_and_top_p(random_generator, run, task):
    def text(*overrides):
        record = run(random_generator, f"task={task}", f"prompt={PROMPT}", "text_temperature=1.0",
                     "image_temperature=0.0", "max_new_tokens=16", *overrides)
        return record["completions"][PROMPT] if task == "text" else record["interleaved"][0]["segments"]

    for top in ("text_top_k=1", "text_top_p=1e-6"):
        assert text(top, "seed=0") == text(top, "seed=1")
    assert text("seed=0") != text("seed=1")


def test_text_task_default_budget_is_64_tokens(random_generator, run):
    record = run(random_generator, "task=text", f"prompt={PROMPT}", "text_temperature=1.0")
    assert record["completions"][PROMPT] == random_generator.complete(PROMPT, max_new_tokens=64, temperature=1.0)
    assert record["completions"][PROMPT] != random_generator.complete(PROMPT, max_new_tokens=48, temperature=1.0)


def test_options_the_task_does_not_read_are_warned_about_by_name(image_first_generator, run, caplog):
    with caplog.at_level(logging.WARNING, logger="chameleon_lite.cli.generate"):
        run(image_first_generator, "task=interleaved", f"prompt={PROMPT}", "n=2", "image_candidates=3",
            "negative_prompt=a red square", "caption_candidates=2", "image_top_k=5", "max_new_tokens=80")
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split("=")[0] for m in messages] == ["caption_candidates", "image_candidates", "n", "negative_prompt"]
    assert all("is not used by task=interleaved" in m for m in messages)
    assert "n=2 is not used by task=interleaved (only by task=t2i): ignored" in messages

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chameleon_lite.cli.generate"):  # options at their defaults
        run(image_first_generator, "task=interleaved", f"prompt={PROMPT}")
        run(image_first_generator, "task=text", f"prompt={PROMPT}", "max_new_tokens=4")
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="chameleon_lite.cli.generate"):
        run(image_first_generator, "task=t2i", f"prompt={PROMPT}", "n=1", "max_new_tokens=80", "text_top_k=3")
    assert [r.getMessage() for r in caplog.records] == [
        "max_new_tokens=80 is not used by task=t2i (only by task=text / interleaved): ignored",
        "text_top_k=3 is not used by task=t2i (only by task=text / interleaved): ignored"]
