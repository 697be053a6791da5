"""Webdataset source (chameleon_lite/data/webdataset.py): tar shards -> documents -> packed rows, bad samples
counted, equal batches on every rank from disjoint shards, and a resume that continues with the exact rows."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from omegaconf import ListConfig
from PIL import Image

from chameleon_lite.config import TOKENIZERS_DIR, ConfigError, compose_config
from chameleon_lite.data import records
from chameleon_lite.data import webdataset as source
from chameleon_lite.data.datamodule import ChameleonDataModule, task_weights
from chameleon_lite.data.packing import REASON_NO_LOSS
from chameleon_lite.data.sequences import IGNORE_INDEX, ImageSegment, TextSegment
from chameleon_lite.data.shapes import ShapesWorld
from chameleon_lite.data.webdataset import ShardSampleError, shard_loader, shard_urls
from chameleon_lite.multimodal_tokenizer import MultimodalTokenizer

wds = pytest.importorskip("webdataset", reason="data=webdataset needs the data extra: pip install -e '.[data]'")

N_SHARDS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return path


@dataclass
class Corpus:
    pattern: str  # brace pattern of the shards
    expected: dict[tuple[int, ...], tuple[int, str]]  # token ids of a good sample's t2i document -> (shard, key)


@pytest.fixture(scope="module")
def tok() -> MultimodalTokenizer:
    return MultimodalTokenizer.from_dir(TOKENIZERS_DIR / "shapes")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok) -> Corpus:
    """4 shards of 2 captioned shapes images each; shard 3 adds an interleaved document, shards 0-2 a bad sample."""
    folder = tmp_path_factory.mktemp("shards")
    world = ShapesWorld(seed=0, image_size=64, length=10)
    pictures = [Image.fromarray(world[i].image.permute(1, 2, 0).numpy()) for i in range(10)]
    captions = [world[i].caption for i in range(10)]
    codes = tok.encode_images(pictures)
    builder = tok.builder("all")
    bad = [{"__key__": "000-corrupt", "png": b"\x89PNG but then garbage" * 8, "txt": b"a red circle"},
           {"__key__": "001-nocaption", "png": png(pictures[0])},
           {"__key__": "002-badutf8", "png": png(pictures[1]), "txt": b"a red \xff\xfe circle"}]
    expected = {}
    for shard in range(N_SHARDS):
        samples = []
        for i in (2 * shard, 2 * shard + 1):
            key = f"{shard:03d}-good{i}"
            samples.append({"__key__": key, "png": png(pictures[i]), "txt": captions[i].encode()})
            expected[tuple(builder.text_to_image(captions[i], codes[i]).input_ids.tolist())] = (shard, key)
        if shard < len(bad):
            samples.insert(1, bad[shard])
        else:
            segments = [{"type": "text", "text": "before"}, {"type": "image", "path": "a.png"},
                        {"type": "text", "text": "between"}, {"type": "image", "path": "b.png"}]
            samples.append({"__key__": f"{shard:03d}-interleaved", "json": json.dumps({"segments": segments}).encode(),
                            "a.png": png(pictures[8]), "b.png": png(pictures[9])})
            doc = builder.document([TextSegment("before"), ImageSegment(codes[8]), TextSegment("between"),
                                    ImageSegment(codes[9])])
            expected[tuple(doc.input_ids.tolist())] = (shard, f"{shard:03d}-interleaved")
        write_shard(folder / f"shard-{shard:03d}.tar", samples)
    return Corpus(str(folder / "shard-{000..003}.tar"), expected)


def data_cfg(pattern: str, *extra: str):
    return compose_config("train", ["data=webdataset", f"data.train_shards='{pattern}'", "data.seq_len=256",
                                    "data.batch_size=2", "data.tasks.caption=0", "data.shuffle_buffer=4",
                                    "data.encode_batch=3", "data.lookahead=2", *extra]).data


def loader(cfg, tok, rows: int, **kwargs):
    cfg.rows_per_epoch = rows
    return shard_loader(cfg, "train_shards", tok, task_weights(cfg.tasks), rows_key="rows_per_epoch", seed=0,
                        **kwargs)


def documents(batches, bos_id: int) -> list[tuple[int, ...]]:
    """The documents of packed batches, in row order (padding left out)."""
    docs = []
    for batch in batches:
        for ids, lens in zip(batch["input_ids"], batch["doc_lens"]):
            for doc in torch.split(ids, [n for n in lens.tolist() if n]):
                if doc[0] == bos_id:
                    docs.append(tuple(doc.tolist()))
    return docs


def test_every_good_sample_appears_once_per_pass(corpus, tok):
    cfg = data_cfg(corpus.pattern)
    batches = list(loader(cfg, tok, rows=16))
    assert len(batches) == 8 and all(b["input_ids"].shape == (2, 256) for b in batches)
    docs = documents(batches, tok.vocab.bos_id)
    n = len(corpus.expected)  # 8 pairs + 1 interleaved
    first, second = docs[:n], docs[n:2 * n]
    assert sorted(first) == sorted(corpus.expected) and sorted(second) == sorted(corpus.expected)
    assert first != second  # every pass reshuffles


def test_epochs_are_reshuffled_and_reproducible(corpus, tok):
    cfg = data_cfg(corpus.pattern)
    a, b = loader(cfg, tok, rows=4), loader(cfg, tok, rows=4, epoch_of=lambda: 1)
    epoch0, again, epoch1 = list(a), list(a), list(b)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(epoch0, again))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(epoch0, epoch1))


BAD_SAMPLES = [  # case, members besides the key, skip reason, a fragment of the fix
    ("corrupt_image", {"png": b"\x89PNG but then garbage" * 8, "txt": b"a red circle"},
     "not a readable image file", "drop the sample from its shard"),
    ("truncated_image", {"png": "TRUNCATED", "txt": b"a red circle"}, "image data corrupt or truncated",
     "drop the sample"),
    ("empty_image", {"jpg": b"", "txt": b"a red circle"}, "image file is empty (0 bytes)", "drop the sample"),
    ("missing_caption", {"png": "GOOD"}, source.REASON_NO_CAPTION, "add <key>.txt"),
    ("missing_image", {"txt": b"a red circle"}, source.REASON_NO_IMAGE, "add <key>.jpg"),
    ("caption_not_utf8", {"png": "GOOD", "txt": b"a red \xff circle"}, records.REASON_NOT_UTF8, "re-encode"),
    ("empty_caption", {"png": "GOOD", "txt": b"  "}, records.REASON_EMPTY_TEXT, "non-empty text"),
    ("bad_json", {"json": b"{not json", "png": "GOOD", "txt": b"a red circle"}, records.REASON_BAD_JSON,
     "fix the member"),
    ("segment_member_missing", {"json": json.dumps({"segments": [{"type": "image", "path": "x.png"}]}).encode()},
     records.REASON_MISSING_IMAGE, "'a.png' for <key>.a.png"),
    ("unknown_segment", {"json": json.dumps({"segments": [{"type": "video", "path": "x.mp4"}]}).encode()},
     records.REASON_UNKNOWN_SEGMENT, "use segment types"),
]


def bad_shard(folder: Path, members: dict) -> Path:
    good = png(Image.fromarray(np.full((64, 64, 3), (220, 30, 30), dtype=np.uint8)))
    noisy = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    values = {"GOOD": good, "TRUNCATED": noisy[: len(noisy) // 2]}
    bad = {"__key__": "bad", **{k: values.get(v, v) if isinstance(v, str) else v for k, v in members.items()}}
    return write_shard(folder / "shard.tar", [{"__key__": "good", "png": good, "txt": b"a red square"}, bad])


@pytest.mark.parametrize("case, members, reason, fix", BAD_SAMPLES, ids=[c for c, *_ in BAD_SAMPLES])
def test_bad_sample_is_counted_and_logged_or_strict_raises(case, members, reason, fix, tmp_path, tok, caplog):
    shard = bad_shard(tmp_path, members)
    skipped: Counter = Counter()
    batches = list(loader(data_cfg(str(shard), "data.batch_size=1"), tok, rows=1, skipped=skipped))
    assert skipped == Counter({reason: 1})  # one pass = one row here: the good sample
    assert len(documents(batches, tok.vocab.bos_id)) == 1
    assert f"{shard}:bad" in caplog.text

    with pytest.raises(ShardSampleError) as err:
        list(loader(data_cfg(str(shard), "data.batch_size=1", "data.strict=true"), tok, rows=1))
    message = str(err.value)
    assert f"{shard}:bad" in message and fix in message and "data.strict" in message


def test_chunks_without_a_loss_token_are_counted_not_packed(corpus, tok):
    # caption documents (64 image codes of prompt, then the caption) split at 48 tokens under loss_on=completion:
    # each first chunk is all prompt, left out and counted; every row keeps a label
    skipped: Counter = Counter()
    cfg = data_cfg(corpus.pattern, "data.tasks={t2i: 0, caption: 1}", "data.loss_on=completion",
                   "data.seq_len=48", "data.overflow=split")
    batches = list(loader(cfg, tok, rows=8, skipped=skipped))
    assert skipped[REASON_NO_LOSS] >= 4
    assert all((row != IGNORE_INDEX).any() for batch in batches for row in batch["labels"])


def test_unreadable_shard_is_counted(corpus, tmp_path, tok):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(corpus.pattern.replace("{000..003}", "000")).read_bytes()[:1500])  # cut mid-sample
    skipped: Counter = Counter()
    list(loader(data_cfg(f"{corpus.pattern.replace('{000..003}', '001')}::{broken}", "data.batch_size=1"), tok,
                rows=1, skipped=skipped))
    assert skipped[source.REASON_BAD_SHARD] >= 1
    with pytest.raises(ShardSampleError, match="broken.tar: cannot read the shard"):
        list(loader(data_cfg(str(broken), "data.batch_size=1", "data.strict=true"), tok, rows=1))


def not_a_tar(path: Path) -> Path:
    path.write_text("not a tar\n")  # e.g. a failed download
    return path


def test_a_stream_whose_only_shard_is_unreadable_reads_the_others_shards(corpus, tmp_path, tok):
    """Without resampling, 2 streams over [good, unreadable] (2 ranks here; 2 loader workers alike): the stream
    holding the unreadable shard counts it and goes on with the other stream's shard; both yield every batch."""
    good = corpus.pattern.replace("{000..003}", "000")
    cfg = data_cfg(f"{good}::{not_a_tar(tmp_path / 'bad.tar')}", "data.batch_size=1")
    skipped: Counter = Counter()
    batches = [list(loader(cfg, tok, rows=8, rank=r, world_size=2, skipped=skipped)) for r in range(2)]
    assert [len(b) for b in batches] == [4, 4]
    assert skipped[source.REASON_BAD_SHARD] >= 1
    assert {corpus.expected[d][0] for b in batches for d in documents(b, tok.vocab.bos_id)} == {0}


def test_resampled_passes_that_draw_only_the_unreadable_shard_are_skips_not_errors(corpus, tmp_path, tok):
    # 2 streams, 1 shard drawn per pass: about every other pass reads only bad.tar
    good = corpus.pattern.replace("{000..003}", "000")
    cfg = data_cfg(f"{good}::{not_a_tar(tmp_path / 'bad.tar')}", "data.batch_size=1", "data.resample=true")
    skipped: Counter = Counter()
    batches = list(loader(cfg, tok, rows=60, rank=0, world_size=2, skipped=skipped))
    assert len(batches) == 30
    assert skipped[source.REASON_BAD_SHARD] >= 5


@pytest.mark.parametrize("resample", [False, True])
def test_no_readable_shard_at_all_is_an_error_naming_the_shards(resample, tmp_path, tok):
    shards = [not_a_tar(tmp_path / f"bad{i}.tar") for i in range(2)]
    cfg = data_cfg(f"{shards[0]}::{shards[1]}", "data.batch_size=1", f"data.resample={str(resample).lower()}")
    with pytest.raises(ValueError, match=r"data.train_shards: none of the 2 shards this stream reads \(.*bad0.tar, "
                                         r".*bad1.tar\) gave a usable sample .*fix or replace the shards"):
        list(loader(cfg, tok, rows=2, rank=0, world_size=2))


def test_ranks_yield_equal_batches_from_disjoint_shards(corpus, tok):
    cfg = data_cfg(corpus.pattern)
    ranks = [loader(cfg, tok, rows=12, rank=r, world_size=2) for r in range(2)]
    batches = [list(r) for r in ranks]
    assert [len(r) for r in ranks] == [len(b) for b in batches] == [3, 3]  # 12 rows / (2 ranks x 2 rows)
    shards = [{corpus.expected[d][0] for d in documents(b, tok.vocab.bos_id)} for b in batches]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(N_SHARDS))


def test_fewer_shards_than_streams_needs_resampling(corpus, tok):
    cfg = data_cfg(corpus.pattern)
    with pytest.raises(ConfigError, match=r"data.train_shards has 4 shards but 2 processes x 3 loader workers.*"
                                          r"data.resample=true"):
        loader(cfg, tok, rows=12, rank=0, world_size=2, num_workers=3)
    cfg = data_cfg(corpus.pattern, "data.resample=true")
    ranks = [loader(cfg, tok, rows=16, rank=r, world_size=8) for r in range(8)]
    assert {len(r) for r in ranks} == {1}
    assert len(list(ranks[7])) == 1


def test_one_validation_shard_validates_every_process_on_all_rows_counting_skips_once(corpus, tmp_path, tok):
    """Two processes and one val shard (README: data.val_shards=shards/val-000000.tar with trainer=ddp): not the
    "fewer shards than streams" error, but the same val rows on both; a bad val sample is counted in the first
    pass only, apart from the training skips."""
    from types import SimpleNamespace

    val = bad_shard(tmp_path, {"png": "TRUNCATED", "txt": b"a red square"})
    cfg = data_cfg(corpus.pattern, f"data.val_shards='{val}'", "data.val_rows=1", "data.batch_size=1")
    rows, modules = [], []
    for rank in range(2):
        dm = ChameleonDataModule(cfg, tokenizer_dir=TOKENIZERS_DIR / "shapes")
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.val_dataloader()
        # two validation passes as Lightning runs them: len(loader) batches, the iterator never exhausted
        rows.append([next(iter(loader))["input_ids"] for _ in range(2)])
        modules.append(dm)
    assert len(loader) == 1 and all(torch.equal(a, b) for a, b in zip(*rows))
    assert torch.equal(rows[0][0], rows[0][1])
    assert all(dm.val_skipped == Counter({"image data corrupt or truncated": 1}) and not dm.skipped for dm in modules)
    assert not any(dm.val_split_over_processes for dm in modules)  # the same rows everywhere: not summed


def count_encoded_images(tok, monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = tok.encode_images

    def counting(images):
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(tok, "encode_images", counting)
    return calls


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_rows_of_an_uninterrupted_run(num_workers, corpus, tok, monkeypatch):
    cfg = data_cfg(corpus.pattern, "data.batch_size=1")
    streams = {"rows": 9, "num_workers": num_workers, "epoch_of": lambda: 1}
    encoded = count_encoded_images(tok, monkeypatch)
    uninterrupted = list(loader(cfg, tok, **streams))
    full_cost = sum(encoded)

    first = loader(cfg, tok, **streams)
    it = iter(first)
    for _ in range(5):  # the run is interrupted after 5 batches
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 5, "world_size": 1, "batch_size": 1}
    del it

    encoded.clear()
    resumed = loader(cfg, tok, **streams)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 5
    for a, b in zip(rest, uninterrupted[5:]):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "positions", "doc_lens"))
    if num_workers == 0:  # the replayed rows were decoded, not VQ-encoded again
        assert sum(encoded) < full_cost
    assert resumed.state_dict() == {"epoch": 1, "batches": 9, "world_size": 1, "batch_size": 1}
    with pytest.raises(ConfigError, match=r"saved by 1 process\(es\) x data.batch_size=1; this run has 2 x 1"):
        loader(cfg, tok, **streams, world_size=2).load_state_dict(state)


def test_shards_are_a_pattern_a_list_or_joined_patterns(corpus):
    one, two = (corpus.pattern.replace("{000..003}", n) for n in ("000", "001"))
    assert shard_urls(corpus.pattern, "train_shards") == [corpus.pattern.replace("{000..003}", f"{i:03d}")
                                                         for i in range(N_SHARDS)]
    assert shard_urls(ListConfig([two, one]), "train_shards") == [two, one]
    assert shard_urls(f"{one}::{two}", "train_shards") == [one, two]
    assert shard_urls(["pipe:cat x.tar"], "train_shards") == ["pipe:cat x.tar"]  # URLs are opened by webdataset
    with pytest.raises(ConfigError, match="'data.val_shards' = 3 is invalid"):
        shard_urls(3, "val_shards")


def test_config_errors_name_the_key(corpus, tmp_path, tok, monkeypatch):
    with pytest.raises(ConfigError, match="'data.train_shards' is required"):
        ChameleonDataModule(compose_config("train", ["data=webdataset"]).data, TOKENIZERS_DIR / "shapes")
    with pytest.raises(ConfigError, match="'data.rows_per_epoch' = 0"):
        ChameleonDataModule(data_cfg(corpus.pattern, "data.rows_per_epoch=0"), TOKENIZERS_DIR / "shapes")
    with pytest.raises(ConfigError, match="'shapes', 'jsonl' or 'webdataset'"):
        ChameleonDataModule(data_cfg(corpus.pattern, "data.source=tfrecord"), TOKENIZERS_DIR / "shapes")
    with pytest.raises(FileNotFoundError, match=r"shard-004.tar \(from data.train_shards\) does not exist"):
        loader(data_cfg(corpus.pattern.replace("003", "009")), tok, rows=4)
    with pytest.raises(ConfigError, match=r"data.rows_per_epoch=3 is less than one batch per process"):
        loader(data_cfg(corpus.pattern), tok, rows=3, world_size=2)
    with pytest.raises(ConfigError, match="model.image_code_embed=appearance .* data=shapes or data=jsonl"):
        ChameleonDataModule(data_cfg(corpus.pattern), TOKENIZERS_DIR / "shapes").train_image_codes()
    monkeypatch.setattr(source, "wds", None)
    with pytest.raises(ConfigError, match=r"pip install 'chameleon-lite\[data\]'"):
        ChameleonDataModule(data_cfg(corpus.pattern), TOKENIZERS_DIR / "shapes")


def logged_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_training_on_shards_resumes_like_an_uninterrupted_run(corpus, tmp_path):
    """`chameleon-train data=webdataset ...` for 7 steps (5 batches per epoch), and the same run resumed from its
    step-4 checkpoint: the resumed steps see the same rows, so they log the same losses."""
    from chameleon_lite.checkpoint import safe_torch_load
    from chameleon_lite.cli.train import train

    shapes_only = ("data.n_train=", "data.n_val=")
    overrides = [*(o for o in TINY_TRAIN if not o.startswith(shapes_only)), "data=webdataset",
                 f"data.train_shards='{corpus.pattern}'", "data.rows_per_epoch=10", "data.val_rows=4",
                 "data.batch_size=2", "data.seq_len=256", "trainer.max_steps=7", "trainer.val_check_interval=2",
                 "callbacks.checkpoint.every_n_train_steps=2", "callbacks.loss_curve=null", "export_weights=false"]
    reference = train(compose_config("train", [*overrides, f"run_dir={tmp_path / 'ref'}"]))
    assert reference["global_step"] == 7 and "val/loss" in reference["metrics"]

    step4 = tmp_path / "ref" / "checkpoints" / "step000004.ckpt"
    assert safe_torch_load(step4)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 4, "world_size": 1, "batch_size": 2}]
    resumed = train(compose_config("train", [*overrides, f"run_dir={tmp_path / 'resumed'}", f"ckpt_path={step4}"]))
    assert resumed["global_step"] == 7
    expected, got = logged_losses(tmp_path / "ref"), logged_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]  # step 5 starts epoch 1
    assert got == pytest.approx({step: expected[step] for step in got}, abs=1e-6)


def test_a_caption_files_bom_and_trailing_newline_are_not_trained_on(tmp_path, tok):
    image = png(Image.fromarray(np.full((64, 64, 3), (220, 30, 30), dtype=np.uint8)))
    docs = {}
    for name, txt in (("plain", b"a red square"), ("as_saved", b"\xef\xbb\xbfa red square\r\n")):
        (tmp_path / name).mkdir()
        shard = write_shard(tmp_path / name / "shard.tar", [{"__key__": "k", "png": image, "txt": txt}])
        docs[name] = documents(list(loader(data_cfg(str(shard), "data.batch_size=1"), tok, rows=1)), tok.vocab.bos_id)
    assert docs["as_saved"] == docs["plain"] and len(docs["plain"]) == 1
