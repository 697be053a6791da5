"""JSONL source (chameleon_lite/data/jsonl.py): records -> documents with the right codes, paths relative to
the JSONL's folder, and a code store keyed by image content and VQ that encodes each image once."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from reliability_helpers import TINY_VQ, build_tiny_tokenizer, shared_dir, torch_threads

from chameleon_lite import files
from chameleon_lite.data.jsonl import load_or_build_jsonl_cache
from chameleon_lite.data.sequences import ImageSegment, TextSegment
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer
from chameleon_lite.vq.api import ImageTokenizer
from chameleon_lite.vq.config import VQConfig
from chameleon_lite.vq.image_io import load_image
from chameleon_lite.vq.model import VQModel

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a dot"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(shared_dir(tmp_path_factory.getbasetemp(), "tokenizer"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Three captioned images (one by absolute path) and an interleaved document reusing two of them."""
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (36 + 4 * i, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    records = [{"image": "../img/0.png", "text": CAPTIONS[0]}, {"image": "../img/1.png", "text": CAPTIONS[1]},
               {"image": str(tmp_path / "img" / "2.png"), "text": CAPTIONS[2]},
               {"segments": [{"type": "text", "text": "before"}, {"type": "image", "path": "../img/2.png"},
                             {"type": "image", "path": "../img/0.png"}, {"type": "text", "text": "after"}]}]
    path = tmp_path / "data" / "train.jsonl"  # relative paths resolve against data/, not the working directory
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def data_cfg(cache_dir: Path, *extra: str):
    return compose_config("train", ["data=jsonl", "data.train_path=unused", f"data.cache_dir={cache_dir}",
                                    "data.seq_len=64", *extra]).data


def load(corpus: Path, tok: MultimodalTokenizer, tokenizer_dir: Path, cache_dir: Path):
    skipped: Counter = Counter()
    cache = load_or_build_jsonl_cache(data_cfg(cache_dir), corpus, tok, tokenizer_dir, skipped)
    assert not skipped
    return cache


def count_encodes(tok: MultimodalTokenizer) -> list[int]:
    """Record the number of images of every ``tok.encode_images`` call."""
    calls: list[int] = []
    encode = tok.encode_images

    def counting(images):
        calls.append(len(images))
        return encode(images)

    tok.encode_images = counting
    return calls


def test_records_become_t2i_caption_and_interleaved_documents_with_their_codes(corpus, tokenizer_dir, tmp_path):
    tok = MultimodalTokenizer.from_dir(tokenizer_dir)
    cache = load(corpus, tok, tokenizer_dir, tmp_path / "cache")
    images = sorted((corpus.parent.parent / "img").glob("*.png"))
    codes = tok.encode_images([load_image(p) for p in images])  # (3, tokens_per_image), encoded independently
    builder = tok.builder("all")

    t2i = cache.documents(builder, ["t2i"], np.array([1.0]), seed=0, epoch=0, shuffle=False)
    caption = cache.documents(builder, ["caption"], np.array([1.0]), seed=0, epoch=0, shuffle=False)
    for i in range(3):
        assert t2i[i].input_ids.tolist() == builder.text_to_image(CAPTIONS[i], codes[i]).input_ids.tolist()
        assert caption[i].input_ids.tolist() == builder.image_to_text(codes[i], CAPTIONS[i]).input_ids.tolist()
    interleaved = builder.document([TextSegment("before"), ImageSegment(codes[2]), ImageSegment(codes[0]),
                                    TextSegment("after")])
    assert t2i[3].input_ids.tolist() == caption[3].input_ids.tolist() == interleaved.input_ids.tolist()
    assert t2i[3].loss_mask.tolist() == interleaved.loss_mask.tolist()


def test_documents_are_a_function_of_seed_and_epoch(corpus, tokenizer_dir, tmp_path):
    tok = MultimodalTokenizer.from_dir(tokenizer_dir)
    builder, tasks = tok.builder("all"), (["t2i", "caption"], np.array([0.5, 0.5]))
    a = load(corpus, tok, tokenizer_dir, tmp_path / "cache")
    b = load(corpus, tok, tokenizer_dir, tmp_path / "cache")

    def ids(cache, epoch):
        return [d.input_ids.tolist() for d in cache.documents(builder, *tasks, seed=3, epoch=epoch)]

    assert ids(a, 0) == ids(b, 0)
    assert ids(a, 0) != ids(a, 1)  # re-shuffled, tasks re-drawn


def test_each_image_content_is_encoded_once_per_vq(corpus, tokenizer_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    tok = MultimodalTokenizer.from_dir(tokenizer_dir)
    calls = count_encodes(tok)
    first = load(corpus, tok, tokenizer_dir, cache_dir)
    assert sum(calls) == 3  # 5 image uses, 3 distinct files

    calls.clear()
    again = load(corpus, tok, tokenizer_dir, cache_dir)
    assert calls == [] and torch.equal(first.codes, again.codes)

    img = corpus.parent.parent / "img"
    shutil.copy(img / "1.png", img / "renamed.png")  # same content, new name: no re-encode
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(img / "0.png")  # new content: one encode
    corpus.write_text(corpus.read_text().replace("img/1.png", "img/renamed.png"))
    load(corpus, tok, tokenizer_dir, cache_dir)
    assert sum(calls) == 1

    other_dir = shutil.copytree(tokenizer_dir, tmp_path / "other_vq")  # same shape, other weights: other store
    torch.manual_seed(1)
    ImageTokenizer(VQModel(VQConfig(**TINY_VQ))).save_pretrained(other_dir)
    other = MultimodalTokenizer.from_dir(other_dir)
    other_calls = count_encodes(other)
    load(corpus, other, other_dir, cache_dir)
    assert sum(other_calls) == 3
    assert len(list(cache_dir.glob("jsonl-images-*.safetensors"))) == 2


def test_a_byte_order_mark_and_crlf_line_ends_cost_no_record(corpus, tokenizer_dir, tmp_path):
    """Notepad and PowerShell's `Out-File -Encoding utf8` start the file with a UTF-8 BOM."""
    tok = MultimodalTokenizer.from_dir(tokenizer_dir)
    plain = load(corpus, tok, tokenizer_dir, tmp_path / "cache")
    corpus.write_bytes(b"\xef\xbb\xbf" + corpus.read_bytes().replace(b"\n", b"\r\n"))
    saved = load(corpus, tok, tokenizer_dir, tmp_path / "cache")  # (load asserts that nothing is skipped)
    assert saved.records == plain.records and torch.equal(saved.codes, plain.codes)


def test_a_second_builder_waits_for_the_first_and_reuses_its_codes(corpus, tokenizer_dir, tmp_path, caplog):
    """Two processes building the code store at once (torchrun ranks, runs sharing data.cache_dir): the second
    waits while the first encodes, then reads the store the first wrote and encodes nothing."""
    first, second = MultimodalTokenizer.from_dir(tokenizer_dir), MultimodalTokenizer.from_dir(tokenizer_dir)
    first_calls, second_calls = count_encodes(first), count_encodes(second)
    encoding, second_waits = threading.Event(), threading.Event()
    encode = first.encode_images

    def slow_encode(images):  # the first builder is mid-encode until the second waits for it (or 10 s passed)
        encoding.set()
        second_waits.wait(timeout=10)
        return encode(images)

    first.encode_images = slow_encode

    class WaitSignal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for another process"):
                second_waits.set()

    files_log = logging.getLogger(files.__name__)
    signal = WaitSignal()
    files_log.addHandler(signal)
    try:
        with caplog.at_level("INFO", logger=files.__name__), ThreadPoolExecutor(2) as pool:
            a = pool.submit(load, corpus, first, tokenizer_dir, tmp_path / "cache")
            assert encoding.wait(timeout=60)
            b = pool.submit(load, corpus, second, tokenizer_dir, tmp_path / "cache")
            a_cache, b_cache = a.result(timeout=120), b.result(timeout=120)
    finally:
        files_log.removeHandler(signal)
    assert sum(first_calls) == 3 and second_calls == []
    assert torch.equal(a_cache.codes, b_cache.codes) and a_cache.records == b_cache.records
